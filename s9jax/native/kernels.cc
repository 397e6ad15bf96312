// CPU kernels for the S9 ops that XLA:CPU runs as many small memory-bound passes:
// depthwise convolution (forward; backward: input and kernel gradients together) and
// BatchNorm's per-channel sums; dense KxK convolutions, which XLA runs through an
// im2col copy (forward, input gradient and kernel gradient, each its own call so XLA
// drops the first layer's unused input gradient); and depthwise-separable convolutions
// (a depthwise conv, then a 1x1) as one op each way, built from the same per-image code,
// the forward also summing its output's channels for the BatchNorm after it.
// Called from s9jax/native.py through jax.ffi; float32 NHWC only; tests/test_ops.py
// checks them against lax.conv_general_dilated.
//
// Each kernel makes one pass over its operands, image by image, with the channel axis
// innermost in vector registers, the conv's zero padding, stride and dilation handled by
// index arithmetic instead of padded or sliced copies, and images split between XLA's
// intra-op threads. On the 2-core dev machine memory traffic, not arithmetic, is what
// these ops cost, so the backward reads each image's output gradient for both
// gradients while it is in cache (the separable op's 1x1 kernel gradient: a few small
// images at a time, so that its sums are not written once per image).
//
// Portable C++17 for GCC and Clang on x86-64 and aarch64: vectors are GCC vector
// extensions, which each target lowers to its own registers (AVX/AVX-512, NEON). Two
// things are architecture-specific: the spin-wait hint, which has a form per target, and
// the bfloat16 dot products of the separable ops' 1x1 and the dense convs, when asked
// for (AVX512-BF16 intrinsics where the compiler targets them, and AMX tiles where it
// targets those; the float32 kernels on rounded operands elsewhere).
// The handlers check their operands' ranks and shapes and their attributes before any
// work and return an InvalidArgument error (a Python exception) for a call the kernels
// would read or write out of bounds for.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Tells the CPU the caller is spinning: on x86 PAUSE, on aarch64 YIELD, which free the
// core's resources for the hyperthread or the pool thread being waited for; elsewhere
// the OS scheduler's yield.
inline void SpinPause() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield" ::: "memory");
#else
  std::this_thread::yield();
#endif
}

// Runs body(chunk) for chunk in [0, chunks) on the caller and XLA's pool. The caller
// claims chunks too and only waits for chunks already running, so it never waits on a
// task the pool has not started (no deadlock when every pool thread is busy); the state
// is shared so a task that starts after the call returned finds no chunk left.
void ParallelChunks(ffi::ThreadPool& pool, int64_t chunks,
                    const std::function<void(int64_t)>& body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t chunks;
    const std::function<void(int64_t)>* body;
  };
  auto state = std::make_shared<State>();
  state->chunks = chunks;
  state->body = &body;
  auto work = [state] {
    for (int64_t i; (i = state->next.fetch_add(1)) < state->chunks;) {
      (*state->body)(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < chunks) SpinPause();
}

// One chunk of [0, n) per pool thread (at least one, at most n).
int64_t NumChunks(ffi::ThreadPool& pool, int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(n, std::max<int64_t>(pool.num_threads(), 1)));
}

// Splits [0, n) evenly into `chunks` ranges and runs body(chunk, begin, end) for each.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t chunks,
                 const std::function<void(int64_t, int64_t, int64_t)>& body) {
  ParallelChunks(pool, chunks, [&](int64_t chunk) {
    body(chunk, n * chunk / chunks, n * (chunk + 1) / chunks);
  });
}

// out[k] = the float64 sum over chunks of partial[chunk * size + k], as float32.
void ReducePartials(const double* partial, int64_t chunks, int64_t size, float* out) {
  for (int64_t k = 0; k < size; ++k) {
    double s = 0.0;
    for (int64_t t = 0; t < chunks; ++t) s += partial[t * size + k];
    out[k] = static_cast<float>(s);
  }
}

// A buffer of n T's for one call of a handler, from the calling thread's buffer for
// Slot S, kept from call to call: fresh vectors cost ~3.5% of fast.py's train step in
// _int_malloc (perf, 24 px), where one malloc arena (s9jax/host_memory.py) serves XLA's
// blocks too. Sizes grow with the thread count (chunks), so a buffer over kKeptBytes is
// the call's own, freed on return: otherwise each thread of a many-core host would keep
// its largest. Slots tell apart the buffers a handler holds at once on its calling
// thread; the chunk bodies keep their own.
enum Slot { kPartialSlot, kBetweenSlot, kTrashSlot, kTotalsSlot, kTransposedSlot, kKernelSlot };
constexpr int64_t kKeptBytes = int64_t{1} << 20;  // A 2-core step's largest is ~0.5 MB.

template <typename T, Slot S>
class CallBuffer {
 public:
  explicit CallBuffer(int64_t n, bool zero = false) {
    thread_local std::vector<T> kept;
    std::vector<T>& buffer = n * static_cast<int64_t>(sizeof(T)) <= kKeptBytes ? kept : own_;
    if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
    data_ = buffer.data();
    if (zero) std::fill(data_, data_ + n, T(0));
  }
  T* get() const { return data_; }

 private:
  std::vector<T> own_;
  T* data_;
};

// Geometry of a depthwise conv: NHWC input (n, h, w, c), kernel (kh, kw, c), output
// (n, oh, ow, c); output pixel (p, q) tap (i, j) reads input (p*sh - ph + i*dh, ...).
struct Geometry {
  int64_t n, h, w, c, kh, kw, oh, ow, sh, sw, dh, dw, ph, pw;

  // Input row read by output row p through kernel row i, or -1 in the padding.
  int64_t InRow(int64_t p, int64_t i) const {
    int64_t r = p * sh - ph + i * dh;
    return r >= 0 && r < h ? r : -1;
  }
  int64_t InCol(int64_t q, int64_t j) const {
    int64_t r = q * sw - pw + j * dw;
    return r >= 0 && r < w ? r : -1;
  }
  // Output row that reads input row r through kernel row i, or -1 if none does.
  int64_t OutRow(int64_t r, int64_t i) const {
    const int64_t t = r + ph - i * dh;
    return t >= 0 && t % sh == 0 && t / sh < oh ? t / sh : -1;
  }
  int64_t OutCol(int64_t s, int64_t j) const {
    const int64_t t = s + pw - j * dw;
    return t >= 0 && t % sw == 0 && t / sw < ow ? t / sw : -1;
  }
};

// From the input's dimensions (x, or dx for the input gradient) and the rest.
template <typename Dims>
Geometry MakeGeometry(const Dims& d, int64_t kh, int64_t kw, int64_t oh, int64_t ow,
                      int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t ph, int64_t pw) {
  return Geometry{d[0], d[1], d[2], d[3], kh, kw, oh, ow, sh, sw, dh, dw, ph, pw};
}

// Vectors of B floats (GCC/Clang vector extensions), loaded and stored unaligned. Any
// target takes any B: a width its registers lack is split into several (16 floats are
// one AVX-512 register, two AVX ones, four NEON ones).
template <int B>
struct Vec {
  typedef float type __attribute__((vector_size(B * sizeof(float)), aligned(sizeof(float))));
};
template <int B>
inline typename Vec<B>::type Load(const float* p) {
  return *reinterpret_cast<const typename Vec<B>::type*>(p);
}
template <int B>
inline void Store(float* p, typename Vec<B>::type v) {
  *reinterpret_cast<typename Vec<B>::type*>(p) = v;
}

// Calls f(integral_constant<B>, c0) for channel blocks [c0, c0 + B) covering [0, c):
// blocks of 16 and 8 whose accumulators stay in vector registers across a pixel's taps,
// then single channels.
template <typename F>
inline void ForChannelBlocks(int64_t c, F&& f) {
  int64_t c0 = 0;
  for (; c0 + 16 <= c; c0 += 16) f(std::integral_constant<int, 16>(), c0);
  for (; c0 + 8 <= c; c0 += 8) f(std::integral_constant<int, 8>(), c0);
  for (; c0 < c; ++c0) f(std::integral_constant<int, 1>(), c0);
}

constexpr int64_t kMaxTaps = 16;  // kh * kw, checked by every handler (CheckConv).
// The separable backward's 1x1 kernel gradient sums this many pixels or more (whole
// images) in float32 before it adds them to its float64 total: a 16x16 map's, one image.
constexpr int64_t kKernelGradPixels = 256;

// The taps that reach one pixel: offsets (in floats) into the image read and into the
// (kh, kw, c) kernel.
struct Taps {
  int64_t count = 0;
  int64_t image[kMaxTaps];
  int64_t kernel[kMaxTaps];
  void Add(int64_t image_offset, int64_t kernel_offset) {
    image[count] = image_offset;
    kernel[count++] = kernel_offset;
  }
};

// out[pixel] = sum over its taps of image[tap] * kernel[tap], for every channel: the
// taps of a kernel other than 3x3, whose rows GatherRow3x3 computes.
inline void DotTaps(const Taps& taps, const float* __restrict image,
                    const float* __restrict kernel, float* __restrict out, int64_t c) {
  ForChannelBlocks(c, [&](auto block, int64_t c0) {
    constexpr int B = decltype(block)::value;
    typename Vec<B>::type acc = {};
    for (int64_t t = 0; t < taps.count; ++t)
      acc += Load<B>(image + taps.image[t] + c0) * Load<B>(kernel + taps.kernel[t] + c0);
    Store<B>(out + c0, acc);
  });
}

// For every destination row u and kernel row i, the source row it reads (or -1: none),
// and the same for columns. The same for every image, so built once per call: for the
// input gradient it divides by the stride (OutRow), which per pixel and tap cost a third
// of the backward pass (128x16x16x48: 2.20 -> 1.48 ms).
struct TapIndex {
  int64_t rows, cols, src_cols;
  std::vector<int64_t> row_of, col_of;  // (rows, kh), (cols, kw).
  // Whether every kernel row (column) of a destination row (column) reads a source one:
  // a pixel at a full row and a full column takes all kh * kw taps.
  std::vector<char> row_full, col_full;  // (rows,), (cols,).
};

template <typename Row, typename Col>
TapIndex MakeTapIndex(const Geometry& g, int64_t rows, int64_t cols, int64_t src_cols,
                      Row row, Col col) {
  TapIndex index{rows, cols, src_cols, std::vector<int64_t>(rows * g.kh),
                 std::vector<int64_t>(cols * g.kw)};
  for (int64_t u = 0; u < rows; ++u)
    for (int64_t i = 0; i < g.kh; ++i) index.row_of[u * g.kh + i] = row(u, i);
  for (int64_t v = 0; v < cols; ++v)
    for (int64_t j = 0; j < g.kw; ++j) index.col_of[v * g.kw + j] = col(v, j);
  const auto full = [](const std::vector<int64_t>& of, int64_t n, int64_t k) {
    std::vector<char> all(n, 1);
    for (int64_t u = 0; u < n; ++u)
      for (int64_t i = 0; i < k; ++i) all[u] &= of[u * k + i] >= 0;
    return all;
  };
  index.row_full = full(index.row_of, rows, g.kh);
  index.col_full = full(index.col_of, cols, g.kw);
  return index;
}

// The forward reads x at InRow/InCol of each output pixel.
TapIndex ForwardIndex(const Geometry& g) {
  return MakeTapIndex(g, g.oh, g.ow, g.w, [&](int64_t p, int64_t i) { return g.InRow(p, i); },
                      [&](int64_t q, int64_t j) { return g.InCol(q, j); });
}

// The input gradient gathers, per input pixel, dy at the outputs that read it.
TapIndex InputGradIndex(const Geometry& g) {
  return MakeTapIndex(g, g.h, g.w, g.ow, [&](int64_t r, int64_t i) { return g.OutRow(r, i); },
                      [&](int64_t s, int64_t j) { return g.OutCol(s, j); });
}

// One destination row of a 3x3 kernel's taps, every pixel: a channel block's 9 kernel
// vectors stay in registers across the row. A pixel whose 9 taps all read the source
// (away from the border; for the input gradient of a strided conv, a pixel every tap
// reaches) adds them unconditionally, four pixels at a time, each with its own
// accumulator: a pixel's nine multiply-adds are one dependent chain, and several chains
// keep the FMA units busy. A border pixel skips the taps that read nothing. Each pixel's
// sum is the one DotTaps gives: the same products in the same order (rows, then
// columns). DotTaps rebuilds the taps and reloads the kernel for each pixel: at 16
// channels (one vector a pixel) that cost 3x the time a channel-pixel that it did at 48
// (forward of a 128x32x32x16 batch: 2.4-2.8 ms by DotTaps, 0.75-0.82 ms here;
// 128x16x16x48: 0.8-1.0 -> 0.3-0.6 ms), and on the last stage's 4x4 maps 12 of 16
// pixels are on the border.
void GatherRow3x3(const TapIndex& index, int64_t u, int64_t c, const float* __restrict src,
                  const float* __restrict w, float* __restrict dst_row) {
  const int64_t* row = &index.row_of[u * 3];
  const int64_t src_stride = index.src_cols * c;
  const int64_t row_offset[3] = {row[0] * src_stride, row[1] * src_stride, row[2] * src_stride};
  const bool full_row = index.row_full[u];
  ForChannelBlocks(c, [&](auto block, int64_t c0) {
    constexpr int B = decltype(block)::value;
    typename Vec<B>::type k[9];
    for (int t = 0; t < 9; ++t) k[t] = Load<B>(w + t * c + c0);
    const auto full = [&](auto count, int64_t v) {
      constexpr int P = decltype(count)::value;
      typename Vec<B>::type acc[P] = {};
      const int64_t* col = &index.col_of[v * 3];
#pragma GCC unroll 3
      for (int i = 0; i < 3; ++i)
#pragma GCC unroll 3
        for (int j = 0; j < 3; ++j)
#pragma GCC unroll 4
          for (int p = 0; p < P; ++p)
            acc[p] += Load<B>(src + row_offset[i] + col[p * 3 + j] * c + c0) * k[i * 3 + j];
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) Store<B>(dst_row + (v + p) * c + c0, acc[p]);
    };
    const auto border = [&](int64_t v) {
      const int64_t* col = &index.col_of[v * 3];
      typename Vec<B>::type acc = {};
#pragma GCC unroll 3
      for (int i = 0; i < 3; ++i) {
        if (row[i] < 0) continue;
#pragma GCC unroll 3
        for (int j = 0; j < 3; ++j)
          if (col[j] >= 0) acc += Load<B>(src + row_offset[i] + col[j] * c + c0) * k[i * 3 + j];
      }
      Store<B>(dst_row + v * c + c0, acc);
    };
    const auto one = [&](int64_t v) {
      if (full_row && index.col_full[v]) {
        full(std::integral_constant<int, 1>(), v);
      } else {
        border(v);
      }
    };
    for (int64_t v = 0; v < index.cols;) {
      if (full_row && v + 4 <= index.cols && index.col_full[v] && index.col_full[v + 1] &&
          index.col_full[v + 2] && index.col_full[v + 3]) {
        full(std::integral_constant<int, 4>(), v);
        v += 4;
      } else {
        one(v++);
      }
    }
  });
}

// dst[u, v] = sum over kernel taps (i, j) of src[row_of(u, i), col_of(v, j)] * w[i, j],
// skipping taps that read nothing: one image's forward (dst = y, src = x) or input
// gradient (dst = dx, src = dy). Same sums in the same order on either path.
void GatherTaps(const Geometry& g, const TapIndex& index, const float* src, const float* w,
                float* dst) {
  if (g.kh == 3 && g.kw == 3) {
    for (int64_t u = 0; u < index.rows; ++u)
      GatherRow3x3(index, u, g.c, src, w, dst + u * index.cols * g.c);
    return;
  }
  for (int64_t u = 0; u < index.rows; ++u) {
    const int64_t* row = &index.row_of[u * g.kh];
    for (int64_t v = 0; v < index.cols; ++v) {
      Taps taps;
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t r = row[i];
        if (r < 0) continue;
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t s = index.col_of[v * g.kw + j];
          if (s >= 0) taps.Add((r * index.src_cols + s) * g.c, (i * g.kw + j) * g.c);
        }
      }
      DotTaps(taps, src, w, dst + (u * index.cols + v) * g.c, g.c);
    }
  }
}

// Adds one image's kernel gradient, sum over p, q of x[in(p, i), in(q, j)] * dy[p, q],
// to total (kh, kw, c): summed in float32 within the image, added in float64. KH, KW > 0
// fix the kernel's size at compile time, so the per-tap accumulators can be registers
// (backward of a 128x16x16x48 batch: 1.48 -> 1.38 ms). `index` (ForwardIndex) gives each
// output row's and column's input rows and columns; a pixel whose taps all read the
// input adds them without a check per tap.
template <int KH, int KW>
void ImageKernelGradFor(const Geometry& g, const TapIndex& index, const float* x,
                        const float* dy, double* total) {
  const int64_t kh = KH > 0 ? KH : g.kh, kw = KW > 0 ? KW : g.kw;
  ForChannelBlocks(g.c, [&](auto block, int64_t c0) {
    constexpr int B = decltype(block)::value;
    typename Vec<B>::type acc[KH > 0 ? KH * KW : kMaxTaps] = {};
    for (int64_t p = 0; p < g.oh; ++p) {
      const int64_t* row = &index.row_of[p * kh];
      const bool full_row = index.row_full[p];
      for (int64_t q = 0; q < g.ow; ++q) {
        const typename Vec<B>::type d = Load<B>(dy + (p * g.ow + q) * g.c + c0);
        const int64_t* col = &index.col_of[q * kw];
        if (full_row && index.col_full[q]) {
#pragma GCC unroll 16
          for (int64_t i = 0; i < kh; ++i)
#pragma GCC unroll 16
            for (int64_t j = 0; j < kw; ++j)
              acc[i * kw + j] += Load<B>(x + (row[i] * g.w + col[j]) * g.c + c0) * d;
          continue;
        }
#pragma GCC unroll 16
        for (int64_t i = 0; i < kh; ++i) {
          if (row[i] < 0) continue;
#pragma GCC unroll 16
          for (int64_t j = 0; j < kw; ++j)
            if (col[j] >= 0) acc[i * kw + j] += Load<B>(x + (row[i] * g.w + col[j]) * g.c + c0) * d;
        }
      }
    }
    for (int64_t t = 0; t < kh * kw; ++t)
      for (int k = 0; k < B; ++k) total[t * g.c + c0 + k] += acc[t][k];
  });
}

void ImageKernelGrad(const Geometry& g, const TapIndex& index, const float* x, const float* dy,
                     double* total) {
  if (g.kh == 3 && g.kw == 3) {
    ImageKernelGradFor<3, 3>(g, index, x, dy, total);
  } else {
    ImageKernelGradFor<0, 0>(g, index, x, dy, total);
  }
}

// Argument checks. The kernels index raw buffers by the dimensions XLA passes and keep
// per-tap arrays of kMaxTaps on the stack, trusting that the operands agree; a call that
// bypasses ops.py (native.py's functions called directly, or a bug there) must fail with
// an error, which reaches Python as an exception, not read or write out of bounds. Each
// handler checks once per call, before any work: the loops are unchanged.

using Dims = ffi::AnyBuffer::Dimensions;

// An InvalidArgument error "<op>: <parts...>".
template <typename... Parts>
ffi::Error Invalid(const char* op, const Parts&... parts) {
  std::ostringstream message;
  message << op << ": ";
  (message << ... << parts);
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, message.str());
}

#define S9_RETURN_IF_ERROR(expr)                    \
  do {                                              \
    if (ffi::Error error = (expr); error.failure()) \
      return error;                                 \
  } while (0)

std::string ShapeString(Dims d) {
  std::ostringstream out;
  out << "(";
  for (size_t k = 0; k < d.size(); ++k) out << (k ? ", " : "") << d[k];
  out << (d.size() == 1 ? ",)" : ")");
  return out.str();
}

ffi::Error CheckRank(const char* op, const char* name, Dims d, size_t rank,
                     const char* layout) {
  if (d.size() == rank) return ffi::Error::Success();
  return Invalid(op, name, " must have rank ", rank, " ", layout, ", got shape ",
                 ShapeString(d));
}

ffi::Error CheckSame(const char* op, const char* name, int64_t value, const char* other,
                     int64_t expected) {
  if (value == expected) return ffi::Error::Success();
  return Invalid(op, name, " (", value, ") must equal ", other, " (", expected, ")");
}

ffi::Error CheckShape(const char* op, const char* name, Dims d, const char* other,
                      Dims expected) {
  if (d == expected) return ffi::Error::Success();
  return Invalid(op, name, " must have ", other, "'s shape ", ShapeString(expected),
                 ", got ", ShapeString(d));
}

// a / b rounded down, b > 0.
int64_t FloorDiv(int64_t a, int64_t b) { return a / b - (a % b != 0 && a < 0); }

// One spatial axis: `out` must be the size lax.conv_general_dilated gives for input size
// `in`, kernel size k, stride s, dilation d and padding (lo, hi), computed without
// overflow, so the kernels' index arithmetic (p * s - lo + i * d) cannot overflow either.
ffi::Error CheckAxis(const char* op, const char* axis, int64_t in, int64_t out, int64_t k,
                     int64_t s, int64_t d, int64_t lo, int64_t hi) {
  int64_t padded, span;  // Every index the kernels compute lies in [-lo, padded].
  if (__builtin_add_overflow(in, lo, &padded) || __builtin_add_overflow(padded, hi, &padded) ||
      __builtin_mul_overflow(k - 1, d, &span)) {
    return Invalid(op, "input ", axis, " ", in, " with kernel ", k, ", stride ", s,
                   ", dilation ", d, " and padding (", lo, ", ", hi, ") overflows int64");
  }
  const int64_t expected = FloorDiv(padded - span - 1, s) + 1;
  if (out == expected) return ffi::Error::Success();
  return Invalid(op, "output ", axis, " ", out, " does not follow from input ", axis, " ", in,
                 ", kernel ", k, ", stride ", s, ", dilation ", d, " and padding (", lo, ", ",
                 hi, "): expected ", expected);
}

// The conv's attributes, and its spatial sizes (g, from the operands) against them.
// g's (ph, pw) is the low padding; the high padding (ph_hi, pw_hi) is an attribute for
// this check only: the kernels take the output size from the buffers.
ffi::Error CheckConv(const char* op, const Geometry& g, int64_t ph_hi, int64_t pw_hi) {
  // kh and kw are bounded first, so their product cannot overflow.
  if (g.kh < 1 || g.kw < 1 || g.kh > kMaxTaps || g.kw > kMaxTaps || g.kh * g.kw > kMaxTaps) {
    return Invalid(op, "a ", g.kh, "x", g.kw, " kernel: the kernels take 1 to ", kMaxTaps,
                   " taps (kMaxTaps, native.MAX_TAPS)");
  }
  if (g.sh < 1 || g.sw < 1) {
    return Invalid(op, "strides must be positive, got (", g.sh, ", ", g.sw, ")");
  }
  if (g.dh < 1 || g.dw < 1) {
    return Invalid(op, "dilations must be positive, got (", g.dh, ", ", g.dw, ")");
  }
  if (g.ph < 0 || ph_hi < 0 || g.pw < 0 || pw_hi < 0) {
    return Invalid(op, "padding must be non-negative, got ((", g.ph, ", ", ph_hi, "), (", g.pw,
                   ", ", pw_hi, "))");
  }
  S9_RETURN_IF_ERROR(CheckAxis(op, "height", g.h, g.oh, g.kh, g.sh, g.dh, g.ph, ph_hi));
  S9_RETURN_IF_ERROR(CheckAxis(op, "width", g.w, g.ow, g.kw, g.sw, g.dw, g.pw, pw_hi));
  return ffi::Error::Success();
}

constexpr char kNhwc[] = "(N, H, W, C)";

ffi::Error DepthwiseForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> y,
                            int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t ph,
                            int64_t pw, int64_t ph_hi, int64_t pw_hi) {
  constexpr char op[] = "s9_depthwise_forward";
  auto xd = x.dimensions();
  auto kd = kernel.dimensions();
  auto yd = y->dimensions();
  S9_RETURN_IF_ERROR(CheckRank(op, "x", xd, 4, kNhwc));
  S9_RETURN_IF_ERROR(CheckRank(op, "kernel", kd, 3, "(KH, KW, C)"));
  S9_RETURN_IF_ERROR(CheckRank(op, "y", yd, 4, kNhwc));
  S9_RETURN_IF_ERROR(CheckSame(op, "kernel channels", kd[2], "x channels", xd[3]));
  S9_RETURN_IF_ERROR(CheckSame(op, "y batch", yd[0], "x batch", xd[0]));
  S9_RETURN_IF_ERROR(CheckSame(op, "y channels", yd[3], "x channels", xd[3]));
  const Geometry g = MakeGeometry(xd, kd[0], kd[1], yd[1], yd[2], sh, sw, dh, dw, ph, pw);
  S9_RETURN_IF_ERROR(CheckConv(op, g, ph_hi, pw_hi));
  const TapIndex index = ForwardIndex(g);
  ParallelFor(pool, g.n, NumChunks(pool, g.n), [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      GatherTaps(g, index, x.typed_data() + n * g.h * g.w * g.c, kernel.typed_data(),
                 y->typed_data() + n * g.oh * g.ow * g.c);
    }
  });
  return ffi::Error::Success();
}

// Both gradients of the depthwise conv, image by image.
ffi::Error DepthwiseBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> dy,
                             ffi::ResultBuffer<ffi::F32> dx,
                             ffi::ResultBuffer<ffi::F32> dkernel, int64_t sh, int64_t sw,
                             int64_t dh, int64_t dw, int64_t ph, int64_t pw, int64_t ph_hi,
                             int64_t pw_hi) {
  constexpr char op[] = "s9_depthwise_backward";
  auto xd = x.dimensions();
  auto kd = kernel.dimensions();
  auto yd = dy.dimensions();
  S9_RETURN_IF_ERROR(CheckRank(op, "x", xd, 4, kNhwc));
  S9_RETURN_IF_ERROR(CheckRank(op, "kernel", kd, 3, "(KH, KW, C)"));
  S9_RETURN_IF_ERROR(CheckRank(op, "dy", yd, 4, kNhwc));
  S9_RETURN_IF_ERROR(CheckShape(op, "dx", dx->dimensions(), "x", xd));
  S9_RETURN_IF_ERROR(CheckShape(op, "dkernel", dkernel->dimensions(), "kernel", kd));
  S9_RETURN_IF_ERROR(CheckSame(op, "kernel channels", kd[2], "x channels", xd[3]));
  S9_RETURN_IF_ERROR(CheckSame(op, "dy batch", yd[0], "x batch", xd[0]));
  S9_RETURN_IF_ERROR(CheckSame(op, "dy channels", yd[3], "x channels", xd[3]));
  const Geometry g = MakeGeometry(xd, kd[0], kd[1], yd[1], yd[2], sh, sw, dh, dw, ph, pw);
  S9_RETURN_IF_ERROR(CheckConv(op, g, ph_hi, pw_hi));
  const int64_t size = g.kh * g.kw * g.c;
  const int64_t chunks = NumChunks(pool, g.n);
  std::vector<double> partial(chunks * size, 0.0);
  const TapIndex index = InputGradIndex(g), forward = ForwardIndex(g);
  ParallelFor(pool, g.n, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* grad = dy.typed_data() + n * g.oh * g.ow * g.c;
      GatherTaps(g, index, grad, kernel.typed_data(), dx->typed_data() + n * g.h * g.w * g.c);
      ImageKernelGrad(g, forward, x.typed_data() + n * g.h * g.w * g.c, grad,
                      partial.data() + chunk * size);
    }
  });
  ReducePartials(partial.data(), chunks, size, dkernel->typed_data());
  return ffi::Error::Success();
}

// Dense (ungrouped) KHxKW convolutions, kernel (kh, kw, cin, cout). XLA computes them as
// im2col and matmuls: a 9x wider copy of the input, and for the input gradient a 9x wider
// matmul output summed back tap by tap. These kernels read the input in place instead,
// with P pixels' accumulators for NB vectors of B channels held in registers while the
// contraction runs (fast.py's 24 -> 48 3x3 conv, batch 128, forward and backward:
// 21.5 ms as XLA's im2col and matmuls, 12.7 ms with these kernels, 11.6 ms in PyTorch).

template <int V>
using Int = std::integral_constant<int, V>;

// Calls f(Int<B>, Int<NB>, c0) for blocks [c0, c0 + NB * B) covering [0, c): up to three
// vectors of 16 (P * NB accumulators and NB operands fit AVX-512's 32 registers for
// P = 8), then three of 8 (24 channels in one pass, not two: Zen 4 runs two 8-wide FMAs
// a cycle, one 16-wide), 16, 8, then single channels.
template <typename F>
inline void ForWideBlocks(int64_t c, F&& f) {
  int64_t c0 = 0;
  for (; c0 + 48 <= c; c0 += 48) f(Int<16>(), Int<3>(), c0);
  if (c0 + 32 <= c) f(Int<16>(), Int<2>(), c0), c0 += 32;
  if (c0 + 24 <= c) f(Int<8>(), Int<3>(), c0), c0 += 24;
  if (c0 + 16 <= c) f(Int<16>(), Int<1>(), c0), c0 += 16;
  if (c0 + 8 <= c) f(Int<8>(), Int<1>(), c0), c0 += 8;
  for (; c0 < c; ++c0) f(Int<1>(), Int<1>(), c0);
}

// Calls f(Int<P>, begin) for blocks [begin, begin + P) covering [0, n): 8s, then 4, 2, 1.
template <typename F>
inline void ForBlocksOf8(int64_t n, F&& f) {
  int64_t b = 0;
  for (; b + 8 <= n; b += 8) f(Int<8>(), b);
  if (b + 4 <= n) f(Int<4>(), b), b += 4;
  if (b + 2 <= n) f(Int<2>(), b), b += 2;
  if (b < n) f(Int<1>(), b);
}

// One image: y[p, q, :] = sum over taps t = (i, j) and input channels of
// x[InRow(p, i), InCol(q, j), ci] * w[t, ci, :], for P pixels of an output row at a time;
// taps in the padding read `zeros` (cin floats), taps no pixel of the block reaches are
// skipped.
void DenseForwardImage(const Geometry& g, int64_t cout, const float* x, const float* w,
                       const float* zeros, float* y) {
  const int64_t cin = g.c;
  for (int64_t p = 0; p < g.oh; ++p) {
    ForBlocksOf8(g.ow, [&](auto pixels, int64_t q0) {
      constexpr int P = decltype(pixels)::value;
      const float* src[kMaxTaps][P];
      int64_t live[kMaxTaps], num_live = 0;
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t r = g.InRow(p, i);
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t t = i * g.kw + j;
          bool reads = false;
          for (int k = 0; k < P; ++k) {
            const int64_t s = g.InCol(q0 + k, j);
            reads |= r >= 0 && s >= 0;
            src[t][k] = r >= 0 && s >= 0 ? x + (r * g.w + s) * cin : zeros;
          }
          if (reads) live[num_live++] = t;
        }
      }
      ForWideBlocks(cout, [&](auto width, auto vectors, int64_t c0) {
        constexpr int B = decltype(width)::value, NB = decltype(vectors)::value;
        typename Vec<B>::type acc[P][NB] = {};
        for (int64_t l = 0; l < num_live; ++l) {
          const int64_t t = live[l];
          const float* wt = w + t * cin * cout + c0;
          for (int64_t ci = 0; ci < cin; ++ci) {
            typename Vec<B>::type wv[NB];
#pragma GCC unroll 4
            for (int v = 0; v < NB; ++v) wv[v] = Load<B>(wt + ci * cout + v * B);
#pragma GCC unroll 8
            for (int k = 0; k < P; ++k) {
              const float xk = src[t][k][ci];
#pragma GCC unroll 4
              for (int v = 0; v < NB; ++v) acc[k][v] += xk * wv[v];
            }
          }
        }
        for (int k = 0; k < P; ++k)
          for (int v = 0; v < NB; ++v)
            Store<B>(y + (p * g.ow + q0 + k) * cout + c0 + v * B, acc[k][v]);
      });
    });
  }
}

// A dense kernel (taps, cin, cout) as (taps, cout, cin) into wt: the layout the input
// gradient (DenseInputGradImage) reads.
void TransposeKernel(const float* w, int64_t taps, int64_t cin, int64_t cout, float* wt) {
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t ci = 0; ci < cin; ++ci)
      for (int64_t co = 0; co < cout; ++co)
        wt[(t * cout + co) * cin + ci] = w[(t * cin + ci) * cout + co];
}

// One image's input gradient, as the forward's transpose: every output pixel adds
// w[t] @ dy[p, q] to the input pixel its tap t read. wt is the kernel as
// (kh, kw, cout, cin); taps in the padding add to `trash` (cin floats).
void DenseInputGradImage(const Geometry& g, int64_t cout, const float* dy, const float* wt,
                         float* trash, float* dx) {
  const int64_t cin = g.c;
  std::fill(dx, dx + g.h * g.w * cin, 0.0f);
  for (int64_t p = 0; p < g.oh; ++p) {
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t r = g.InRow(p, i);
      if (r < 0) continue;
      ForBlocksOf8(g.ow, [&](auto pixels, int64_t q0) {
        constexpr int P = decltype(pixels)::value;
        const float* grad = dy + (p * g.ow + q0) * cout;
        for (int64_t j = 0; j < g.kw; ++j) {
          float* dst[P];
          bool writes = false;
          for (int k = 0; k < P; ++k) {
            const int64_t s = g.InCol(q0 + k, j);
            writes |= s >= 0;
            dst[k] = s >= 0 ? dx + (r * g.w + s) * cin : trash;
          }
          if (!writes) continue;
          const float* wtap = wt + (i * g.kw + j) * cout * cin;
          ForWideBlocks(cin, [&](auto width, auto vectors, int64_t c0) {
            constexpr int B = decltype(width)::value, NB = decltype(vectors)::value;
            typename Vec<B>::type acc[P][NB] = {};
            for (int64_t co = 0; co < cout; ++co) {
              typename Vec<B>::type wv[NB];
#pragma GCC unroll 4
              for (int v = 0; v < NB; ++v) wv[v] = Load<B>(wtap + co * cin + c0 + v * B);
#pragma GCC unroll 8
              for (int k = 0; k < P; ++k) {
                const float dk = grad[k * cout + co];
#pragma GCC unroll 4
                for (int v = 0; v < NB; ++v) acc[k][v] += dk * wv[v];
              }
            }
            for (int k = 0; k < P; ++k)
              for (int v = 0; v < NB; ++v) {
                float* out = dst[k] + c0 + v * B;
                Store<B>(out, Load<B>(out) + acc[k][v]);
              }
          });
        }
      });
    }
  }
}

// total[(row0 + k) * cout + c0 + channel] += acc[k], the float32 sums of one image's
// rows of the kernel gradient (row = tap * cin + input channel), added in float64.
template <int R, int NB, typename V>
inline void AddKernelGradRows(const V (&acc)[R][NB], int64_t row0, int64_t cout, int64_t c0,
                              double* total) {
  constexpr int B = sizeof(V) / sizeof(float);
  for (int k = 0; k < R; ++k)
    for (int v = 0; v < NB; ++v)
      for (int b = 0; b < B; ++b) total[(row0 + k) * cout + c0 + v * B + b] += acc[k][v][b];
}

// DenseKernelGradImage for fewer than 8 input channels (the stem's 3), where blocks of
// one tap's channels would leave the accumulators mostly idle: rows of the kernel
// gradient are (tap, input channel) pairs, R at a time, each reading its own tap.
void DenseKernelGradRows(const Geometry& g, int64_t cout, const float* x, const float* dy,
                         double* total) {
  const int64_t cin = g.c;
  ForBlocksOf8(g.kh * g.kw * cin, [&](auto rows, int64_t row0) {
    constexpr int R = decltype(rows)::value;
    int64_t tap_i[R], tap_j[R], channel[R];
    for (int k = 0; k < R; ++k) {
      const int64_t t = (row0 + k) / cin;
      tap_i[k] = t / g.kw, tap_j[k] = t % g.kw, channel[k] = (row0 + k) % cin;
    }
    ForWideBlocks(cout, [&](auto width, auto vectors, int64_t c0) {
      constexpr int B = decltype(width)::value, NB = decltype(vectors)::value;
      typename Vec<B>::type acc[R][NB] = {};
      for (int64_t p = 0; p < g.oh; ++p) {
        const float* row_of[R];  // Each row's input row at its channel, or null.
        for (int k = 0; k < R; ++k) {
          const int64_t r = g.InRow(p, tap_i[k]);
          row_of[k] = r >= 0 ? x + r * g.w * cin + channel[k] : nullptr;
        }
        for (int64_t q = 0; q < g.ow; ++q) {
          const float* grad = dy + (p * g.ow + q) * cout + c0;
          typename Vec<B>::type dv[NB];
#pragma GCC unroll 4
          for (int v = 0; v < NB; ++v) dv[v] = Load<B>(grad + v * B);
#pragma GCC unroll 8
          for (int k = 0; k < R; ++k) {
            const int64_t s = g.InCol(q, tap_j[k]);
            const float xk = row_of[k] && s >= 0 ? row_of[k][s * cin] : 0.0f;
#pragma GCC unroll 4
            for (int v = 0; v < NB; ++v) acc[k][v] += xk * dv[v];
          }
        }
      }
      AddKernelGradRows(acc, row0, cout, c0, total);
    });
  });
}

// Adds one image's kernel gradient, sum over p, q of x[InRow(p, i), InCol(q, j), ci] *
// dy[p, q, :], to total (kh, kw, cin, cout): CI input channels by NB vectors of output
// channels at a time, summed in float32 within the image, added in float64.
void DenseKernelGradImage(const Geometry& g, int64_t cout, const float* x, const float* dy,
                          double* total) {
  const int64_t cin = g.c;
  if (cin < 8) return DenseKernelGradRows(g, cout, x, dy, total);
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t t = i * g.kw + j;
      ForBlocksOf8(cin, [&](auto rows, int64_t ci0) {
        constexpr int CI = decltype(rows)::value;
        ForWideBlocks(cout, [&](auto width, auto vectors, int64_t c0) {
          constexpr int B = decltype(width)::value, NB = decltype(vectors)::value;
          typename Vec<B>::type acc[CI][NB] = {};
          for (int64_t p = 0; p < g.oh; ++p) {
            const int64_t r = g.InRow(p, i);
            if (r < 0) continue;
            for (int64_t q = 0; q < g.ow; ++q) {
              const int64_t s = g.InCol(q, j);
              if (s < 0) continue;
              const float* xp = x + (r * g.w + s) * cin + ci0;
              const float* grad = dy + (p * g.ow + q) * cout + c0;
              typename Vec<B>::type dv[NB];
#pragma GCC unroll 4
              for (int v = 0; v < NB; ++v) dv[v] = Load<B>(grad + v * B);
#pragma GCC unroll 8
              for (int k = 0; k < CI; ++k) {
                const float xk = xp[k];
#pragma GCC unroll 4
                for (int v = 0; v < NB; ++v) acc[k][v] += xk * dv[v];
              }
            }
          }
          AddKernelGradRows(acc, t * cin + ci0, cout, c0, total);
        });
      });
    }
  }
}

// Depthwise-separable convs (a depthwise KHxKW conv, then a 1x1 to f channels) as one
// op: the depthwise output never leaves the image being computed. Unfused, it is written
// to memory and read back by the 1x1 conv, its kernel gradient, and (through the 1x1's
// input gradient, written and read again) the depthwise backward: on these networks'
// 16-96-channel maps each pass costs as much as the arithmetic it carries. Here each
// image's depthwise output and its gradient live in a per-thread buffer in cache: the
// forward reads x and writes y; the backward recomputes the depthwise output from x and
// reads x and dy once, writing dx. Same sums as the unfused kernels, image by image.

// The 1x1 conv's geometry over one image's depthwise output (oh, ow, c).
Geometry PointwiseGeometry(const Geometry& g) {
  return Geometry{1, g.oh, g.ow, g.c, 1, 1, g.oh, g.ow, 1, 1, 1, 1, 0, 0};
}

// The operands' ranks and shapes: x (n, h, w, c), depthwise kernel (kh, kw, c),
// pointwise kernel (c, f), and the output (gradient) (n, oh, ow, f).
ffi::Error CheckSeparable(const char* op, Dims xd, Dims dd, Dims pd, Dims yd,
                          const char* y_name) {
  S9_RETURN_IF_ERROR(CheckRank(op, "x", xd, 4, kNhwc));
  S9_RETURN_IF_ERROR(CheckRank(op, "depthwise kernel", dd, 3, "(KH, KW, C)"));
  S9_RETURN_IF_ERROR(CheckRank(op, "pointwise kernel", pd, 2, "(C, F)"));
  S9_RETURN_IF_ERROR(CheckRank(op, y_name, yd, 4, kNhwc));
  S9_RETURN_IF_ERROR(CheckSame(op, "depthwise kernel channels", dd[2], "x channels", xd[3]));
  S9_RETURN_IF_ERROR(CheckSame(op, "pointwise kernel input channels", pd[0], "x channels",
                               xd[3]));
  S9_RETURN_IF_ERROR(CheckSame(op, (std::string(y_name) + " batch").c_str(), yd[0], "x batch",
                               xd[0]));
  return CheckSame(op, "output channels", yd[3], "pointwise kernel output channels", pd[1]);
}

// The separable ops' optional prologue, a BatchNorm with known statistics and a ReLU on
// their input: `prologue` is (3, C), rows shift, scale and bias, for relu(scale * (x -
// shift) + bias), or (0, C) for none. The previous layer's BatchNorm-apply and ReLU then
// never write their output: the conv computes it image by image, in cache.
// An optional per-channel operand or result of `rows` rows: (rows, C), or (0, C) for none.
ffi::Error CheckRowsOrNone(const char* op, const char* name, Dims d, int64_t rows, int64_t c) {
  if (d.size() == 2 && (d[0] == rows || d[0] == 0) && d[1] == c) return ffi::Error::Success();
  return Invalid(op, name, " must have shape (", rows, ", ", c, ") or (0, ", c, "), got ",
                 ShapeString(d));
}

ffi::Error CheckPrologue(const char* op, Dims prologue, int64_t c) {
  S9_RETURN_IF_ERROR(CheckRank(op, "prologue", prologue, 2, "(3 or 0, C)"));
  return CheckRowsOrNone(op, "prologue", prologue, 3, c);
}

// out = relu(scale * (x - shift) + bias) over `pixels` pixels of `c` channels.
void NormaliseRelu(int64_t pixels, int64_t c, const float* __restrict x,
                   const float* __restrict prologue, float* __restrict out) {
  const float* __restrict shift = prologue;
  const float* __restrict scale = prologue + c;
  const float* __restrict bias = prologue + 2 * c;
  for (int64_t p = 0; p < pixels; ++p)
    for (int64_t k = 0; k < c; ++k)
      out[p * c + k] = std::max(scale[k] * (x[p * c + k] - shift[k]) + bias[k], 0.0f);
}

// The prologue's backward for one image: g = dz where z = relu(...) > 0, else 0;
// dx = scale * g, and adds sum of g and sum of g * (x - shift) per channel (bias's and
// scale's gradients; shift's is -scale * the first) to total (2, c), summed in float32
// along each image row and added in float64, as ChannelSums does.
void NormaliseReluGrad(int64_t rows, int64_t cols, int64_t c, const float* __restrict x,
                       const float* __restrict z, const float* __restrict dz,
                       const float* __restrict prologue, float* __restrict dx, double* total) {
  const float* __restrict shift = prologue;
  const float* __restrict scale = prologue + c;
  for (int64_t r = 0; r < rows; ++r) {
    // A channel block's two row sums stay in registers along the row (as ChannelSums').
    ForChannelBlocks(c, [&](auto block, int64_t c0) {
      constexpr int B = decltype(block)::value;
      using V = typename Vec<B>::type;
      const V zero = {}, shift_c = Load<B>(shift + c0), scale_c = Load<B>(scale + c0);
      V sum_g = {}, sum_gx = {};
      for (int64_t q = 0; q < cols; ++q) {
        const int64_t at = (r * cols + q) * c + c0;
        const V g = Load<B>(z + at) > zero ? Load<B>(dz + at) : zero;
        Store<B>(dx + at, scale_c * g);
        sum_g += g;
        sum_gx += g * (Load<B>(x + at) - shift_c);
      }
      for (int k = 0; k < B; ++k) {
        total[c0 + k] += sum_g[k];
        total[c + c0 + k] += sum_gx[k];
      }
    });
  }
}

// The separable ops' 1x1 conv with bfloat16 operands (attribute `bf16` = 1): the
// depthwise output, the output gradient and the 1x1 kernel rounded to bfloat16 (to
// nearest, ties to even), their products summed in float32, as mixed precision on a TPU
// or GPU does. CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids) multiply-add two input
// channels per float32 lane in one instruction where a float32 FMA does one: the 1x1
// products at fast.py's shapes ran 1.6-1.9x faster alone (the kernel gradient of the
// 16x16 maps 1.1x, paying to pair its pixels), docs/performance.md. Intel's run them no
// faster than FMAs, so where the CPU has AMX tiles the 1x1's three products use those
// (AmxGemm), and so do the dense convs'. Other CPUs compute the same rounded products
// with the float32 kernels (no faster than float32).

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define S9_BF16_DOT 1

inline int64_t RoundUp16(int64_t n) { return (n + 15) / 16 * 16; }

// Lanes [0, n) of 16 (n <= 0: none).
inline __mmask16 TailMask(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// The 16 pairs (even[j], odd[j]) of lanes j in m (zero elsewhere, and for a null row)
// in bfloat16, one 32-bit pair per lane.
inline __m512i Bf16Pairs(const float* even, const float* odd, __mmask16 m) {
  // cvtne2ps puts the even row's 16 values in the low half, the odd row's in the high.
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10,
                                              25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3,
                                              18, 2, 17, 1, 16, 0);
  const __m512 e = even ? _mm512_maskz_loadu_ps(m, even) : _mm512_setzero_ps();
  const __m512 o = odd ? _mm512_maskz_loadu_ps(m, odd) : _mm512_setzero_ps();
  return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(o, e));
}

// Calls store(p / 2, c0, v) for each row pair p, p + 1 < r and 16 columns c0 < c of r
// rows of c float32, row k at row(k) (null: zeros): v holds the 16 pairs (row(p)[j],
// row(p + 1)[j]) in bfloat16, zero past r and c, one 32-bit pair per lane.
template <typename Row, typename Store>
void ForRowPairs(int64_t r, int64_t c, Row&& row, Store&& store) {
  for (int64_t p = 0; p < r; p += 2) {
    const float* even_row = row(p);
    const float* odd_row = p + 1 < r ? row(p + 1) : nullptr;
    for (int64_t c0 = 0; c0 < c; c0 += 16)
      store(p / 2, c0, Bf16Pairs(even_row ? even_row + c0 : nullptr,
                                 odd_row ? odd_row + c0 : nullptr, TailMask(c - c0)));
  }
}

// r rows of c float32, row k at row(k) (null: zeros), as row pairs: dst (ceil(r / 2),
// RoundUp16(c), 2) bfloat16 with dst[k, j] = (row(2k)[j], row(2k + 1)[j]), zero past r
// and c: the layout of a matrix contracted over its rows, one 32-bit pair per lane.
template <typename Row>
void PackRowPairsOf(int64_t r, int64_t c, Row&& row, uint16_t* dst) {
  const int64_t c16 = RoundUp16(c);
  ForRowPairs(r, c, row, [&](int64_t pair, int64_t c0, __m512i v) {
    _mm512_storeu_si512(dst + (pair * c16 + c0) * 2, v);
  });
}

// src (r, c) float32 as row pairs (PackRowPairsOf).
void PackRowPairs(int64_t r, int64_t c, const float* src, uint16_t* dst) {
  PackRowPairsOf(r, c, [&](int64_t k) { return src + k * c; }, dst);
}

// src (r, c) float32 as bfloat16 (r, c rounded up to even), zero in the padding: row
// by row, so each 32-bit word holds a pair of channels (a matrix contracted over them).
void PackChannelPairs(int64_t r, int64_t c, const float* src, uint16_t* dst) {
  const int64_t c2 = c + (c & 1);
  for (int64_t p = 0; p < r; ++p)
    for (int64_t c0 = 0; c0 < c2; c0 += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(TailMask(c - c0), src + p * c + c0);
      _mm256_mask_storeu_epi16(dst + p * c2 + c0, TailMask(c2 - c0),
                               (__m256i)_mm512_cvtneps_pbh(v));
    }
}

// Calls f(Int<NB>, v0) for blocks of NB vectors [v0, v0 + NB) covering [0, n): 3s, then
// 2, 1 (P = 8 rows by 3 vectors of accumulators and 3 operands fit 32 registers).
template <typename F>
inline void ForVectorBlocks(int64_t n, F&& f) {
  int64_t v = 0;
  for (; v + 3 <= n; v += 3) f(Int<3>(), v);
  if (v + 2 <= n) f(Int<2>(), v), v += 2;
  if (v < n) f(Int<1>(), v);
}

// acc[k][v] += the sum over pairs j of a[k]'s pair j (at a[k] + 2 * j * a_pair) times
// b's pair row j, vector v (at b + j * b_pair + 32 * v), each pair one dot product: P
// rows by NB vectors of 16 float32 sums, the products of every bfloat16 kernel here.
template <int P, int NB>
inline void Bf16Accumulate(const uint16_t* const (&a)[P], int64_t a_pair, int64_t pairs,
                           const uint16_t* b, int64_t b_pair, __m512 (&acc)[P][NB]) {
  for (int64_t j = 0; j < pairs; ++j) {
    __m512bh bv[NB];
#pragma GCC unroll 4
    for (int v = 0; v < NB; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + j * b_pair + 32 * v);
#pragma GCC unroll 8
    for (int k = 0; k < P; ++k) {
      int32_t pair;
      std::memcpy(&pair, a[k] + 2 * j * a_pair, sizeof pair);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < NB; ++v) acc[k][v] = _mm512_dpbf16_ps(acc[k][v], av, bv[v]);
    }
  }
}

// For rows [0, rows) and 16-column vectors c0 < cols, out(row, c0, acc) with acc = the
// sum over pairs j of a's pair (row, j) times b's pair row j, each pair one dot product:
// a's pairs at a + 2 * (row * a_row + j * a_pair), b (pairs, RoundUp16(cols), 2).
template <typename Out>
void Bf16Gemm(int64_t rows, int64_t pairs, int64_t cols, const uint16_t* a, int64_t a_row,
              int64_t a_pair, const uint16_t* b, Out&& out) {
  const int64_t c16 = RoundUp16(cols);
  ForBlocksOf8(rows, [&](auto block, int64_t r0) {
    constexpr int P = decltype(block)::value;
    const uint16_t* a_rows[P];
    for (int k = 0; k < P; ++k) a_rows[k] = a + 2 * (r0 + k) * a_row;
    ForVectorBlocks(c16 / 16, [&](auto vectors, int64_t v0) {
      constexpr int NB = decltype(vectors)::value;
      __m512 acc[P][NB];
      for (int k = 0; k < P; ++k)
        for (int v = 0; v < NB; ++v) acc[k][v] = _mm512_setzero_ps();
      Bf16Accumulate(a_rows, a_pair, pairs, b + 32 * v0, 2 * c16, acc);
      for (int k = 0; k < P; ++k)
        for (int v = 0; v < NB; ++v) out(r0 + k, (v0 + v) * 16, acc[k][v]);
    });
  });
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define S9_AMX 1
// Intel's AMX tiles (Sapphire Rapids and later): one TDPBF16PS multiplies a 16 x 32
// bfloat16 tile by a 32 x 16 one into 16 x 16 float32 sums. On a 2-core Xeon, where
// fast.py's step ran 0.8-0.9x float32's with AVX512-BF16 products, tiles took its
// bfloat16-1x1 step to 1.10-1.21x float32's (docs/benchmarks.md, "fast.py on an Intel
// Xeon"). Linux gives a process the tiles' state only when asked; if it refuses, the
// AVX512-BF16 kernels compute the same products.
bool AmxUsable() {
  static const bool usable = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}

// The tile configuration LDTILECFG reads: per tile, its rows and bytes a row.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3 hold up to 64 columns of 16 rows' float32 sums; the left operand (16 rows of
// up to 16 bfloat16 pairs) loads into tile 4, or 5 for a last chunk of `pairs % 16`
// pairs; the right one (pairs down, 16 columns of pairs across) into 6, or 7 for that
// chunk. Configures them for products summed over chunks of `pairs` pairs.
void AmxConfigure(int64_t pairs) {
  const int64_t tail = pairs % 16;
  TileConfig config;
  for (int t : {0, 1, 2, 3, 4, 6}) config.rows[t] = 16, config.bytes_per_row[t] = 64;
  if (tail) {
    config.rows[5] = 16, config.bytes_per_row[5] = static_cast<uint16_t>(4 * tail);
    config.rows[7] = static_cast<uint8_t>(tail), config.bytes_per_row[7] = 64;
  }
  _tile_loadconfig(&config);
}

inline void AmxZero() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// Adds to tiles [0, nt) the products of a (16 rows `a_stride` bytes apart, `pairs` pairs
// each) and b ((pairs, 16 * nt, 2) bfloat16, rows `b_stride` bytes apart), as configured
// by AmxConfigure(pairs).
inline void AmxAccumulate(const uint16_t* a, int64_t a_stride, const uint16_t* b,
                          int64_t b_stride, int64_t pairs, int64_t nt) {
  for (int64_t j = 0; j < pairs; j += 16) {
    const uint16_t* a_tile = a + 2 * j;
    const uint16_t* b_tile = b + j * (b_stride / 2);
    // The tile numbers are immediates: one unrolled call per (a, b) pair of tiles.
#define S9_AMX_STEP(A, B)                                                       \
  _tile_loadd(A, a_tile, a_stride);                                             \
  _tile_loadd(B, b_tile, b_stride);                                             \
  _tile_dpbf16ps(0, A, B);                                                      \
  if (nt > 1) { _tile_loadd(B, b_tile + 32, b_stride); _tile_dpbf16ps(1, A, B); } \
  if (nt > 2) { _tile_loadd(B, b_tile + 64, b_stride); _tile_dpbf16ps(2, A, B); } \
  if (nt > 3) { _tile_loadd(B, b_tile + 96, b_stride); _tile_dpbf16ps(3, A, B); }
    if (pairs - j >= 16) {
      S9_AMX_STEP(4, 6)
    } else {
      S9_AMX_STEP(5, 7)
    }
#undef S9_AMX_STEP
  }
}

// Calls out(r, 16 * t, v) for the first n rows r of tiles t < nt, v their 16 sums.
template <typename Out>
inline void AmxStore(int64_t n, int64_t nt, Out&& out) {
  alignas(64) float sums[16][64];
  _tile_stored(0, &sums[0][0], sizeof sums[0]);
  if (nt > 1) _tile_stored(1, &sums[0][16], sizeof sums[0]);
  if (nt > 2) _tile_stored(2, &sums[0][32], sizeof sums[0]);
  if (nt > 3) _tile_stored(3, &sums[0][48], sizeof sums[0]);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t t = 0; t < nt; ++t) out(r, 16 * t, _mm512_load_ps(&sums[r][16 * t]));
}

// Bf16Gemm's products for a's pairs contiguous in each row (a_pair = 1), on AMX tiles
// configured by AmxConfigure(pairs): out(row, c0, acc) for 16-row blocks of a, 16-column
// tiles of b, summed over 16 pairs (a tail of fewer) at a time.
template <typename Out>
void AmxProducts(int64_t rows, int64_t pairs, int64_t cols, const uint16_t* a, int64_t a_row,
                 const uint16_t* b, Out&& out) {
  const int64_t c16 = RoundUp16(cols), tiles = c16 / 16;
  alignas(64) uint16_t padded[16 * 2 * 256];  // A last block of fewer than 16 rows.
  const int64_t a_stride = 4 * a_row;
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t n = std::min<int64_t>(16, rows - r0);
    const uint16_t* a_block = a + 2 * r0 * a_row;
    if (n < 16) {  // Rows past the end read zeros from a copy.
      std::memcpy(padded, a_block, n * a_stride);
      std::memset(padded + 2 * n * a_row, 0, (16 - n) * a_stride);
      a_block = padded;
    }
    for (int64_t t0 = 0; t0 < tiles; t0 += 4) {
      const int64_t nt = std::min<int64_t>(4, tiles - t0);
      AmxZero();
      AmxAccumulate(a_block, a_stride, b + 32 * t0, 4 * c16, pairs, nt);
      AmxStore(n, nt, [&](int64_t r, int64_t c, __m512 v) { out(r0 + r, 16 * t0 + c, v); });
    }
  }
}

// AmxProducts alone: configures the tiles, and releases them after.
template <typename Out>
void AmxGemm(int64_t rows, int64_t pairs, int64_t cols, const uint16_t* a, int64_t a_row,
             const uint16_t* b, Out&& out) {
  AmxConfigure(pairs);
  AmxProducts(rows, pairs, cols, a, a_row, b, out);
  _tile_release();
}
#else
#define S9_AMX 0
#endif

// One image's y (pixels, f) = d (pixels, c) @ w, w packed in row pairs (ConvKernel);
// `scratch` holds d in bfloat16. Also the input gradient: dd = dy @ w^T with (f, c).
void Bf16Pointwise(int64_t pixels, int64_t c, int64_t f, const float* d,
                   const uint16_t* packed, std::vector<uint16_t>& scratch, float* y) {
  const int64_t c2 = c + (c & 1);
  scratch.resize(pixels * c2);
  PackChannelPairs(pixels, c, d, scratch.data());
  const auto store = [&](int64_t r, int64_t c0, __m512 v) {
    _mm512_mask_storeu_ps(y + r * f + c0, TailMask(f - c0), v);
  };
#if S9_AMX
  if (c2 <= 512 && AmxUsable())  // At most 256 pairs a row: AmxGemm's `padded`.
    return AmxGemm(pixels, c2 / 2, f, scratch.data(), c2 / 2, packed, store);
#endif
  Bf16Gemm(pixels, c2 / 2, f, scratch.data(), c2 / 2, 1, packed, store);
}

// The products' out(r, c0, v) for a kernel gradient: adds the float32 sums v of row r,
// columns [c0, c0 + 16), to total (rows, f) in float64; rows past `rows` (a block's
// padding) and columns past f are dropped.
inline auto AddSumsTo(double* total, int64_t rows, int64_t f) {
  return [=](int64_t r, int64_t c0, __m512 v) {
    if (r >= rows) return;
    float sums[16];
    _mm512_storeu_ps(sums, v);
    const int64_t n = std::min<int64_t>(16, f - c0);
    for (int64_t k = 0; k < n; ++k) total[r * f + c0 + k] += sums[k];
  };
}

// Adds a^T @ b to total (c, f), a and b (pairs, RoundUp16(c or f), 2) row pairs summed in
// float32, added in float64: a kernel gradient, contracted over pixels.
void Bf16AddProducts(int64_t c, int64_t pairs, int64_t f, const uint16_t* a, const uint16_t* b,
                     double* total) {
  Bf16Gemm(c, pairs, f, a, 1, RoundUp16(c), b, AddSumsTo(total, c, f));
}

#if S9_AMX
// Transposes 16 vectors of 16 32-bit lanes in registers: lane j of r[i] goes to lane i
// of r[j].
inline void Transpose16x16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8)
    for (int k = 0; k < 4; ++k) {
      t[i + k] = _mm512_shuffle_i32x4(r[i + k], r[i + k + 4], 0x88);
      t[i + k + 4] = _mm512_shuffle_i32x4(r[i + k], r[i + k + 4], 0xdd);
    }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0x88);
    r[k + 8] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0xdd);
  }
}

// src (r, c) float32 as the tiles' left operand of a product contracted over its rows:
// dst (RoundUp16(c), ceil(r / 2)) of bfloat16 row pairs, dst[k, j] = (src[2j, k],
// src[2j + 1, k]), zero past r and c. 16 pairs by 16 channels at a time, transposed in
// registers: fast.py's step ran 1.04x as fast as with each vector of pairs scattered
// down a column (five rounds, alternating, on a 2-core Xeon).
void PackRowPairsTransposed(int64_t r, int64_t c, const float* src, uint16_t* dst) {
  const int64_t pairs = (r + 1) / 2;
  for (int64_t j0 = 0; j0 < pairs; j0 += 16) {
    const __mmask16 live = TailMask(pairs - j0);
    for (int64_t c0 = 0; c0 < c; c0 += 16) {
      const __mmask16 m = TailMask(c - c0);
      __m512i v[16];
      for (int j = 0; j < 16; ++j) {
        const int64_t even = 2 * (j0 + j);
        v[j] = Bf16Pairs(even < r ? src + even * c + c0 : nullptr,
                         even + 1 < r ? src + (even + 1) * c + c0 : nullptr, m);
      }
      Transpose16x16(v);
      for (int k = 0; k < 16; ++k)
        _mm512_mask_storeu_epi32(dst + 2 * ((c0 + k) * pairs + j0), live, v[k]);
    }
  }
}
#endif

// Adds one image's kernel gradient, d (pixels, c)^T @ dy (pixels, f), to total (c, f):
// summed in float32 within the image, added in float64.
void Bf16PointwiseKernelGrad(int64_t pixels, int64_t c, int64_t f, const float* d,
                             const float* dy, std::vector<uint16_t>& scratch, double* total) {
  const int64_t pairs = (pixels + 1) / 2, c16 = RoundUp16(c);
  scratch.resize(pairs * (c16 + RoundUp16(f)) * 2);
  uint16_t* d_pairs = scratch.data();
  uint16_t* dy_pairs = d_pairs + pairs * c16 * 2;
  PackRowPairs(pixels, f, dy, dy_pairs);
#if S9_AMX
  if (AmxUsable()) {  // d's pixel pairs along its rows, channels down: the tiles' layout.
    PackRowPairsTransposed(pixels, c, d, d_pairs);
    return AmxGemm(c16, pairs, f, d_pairs, pairs, dy_pairs, AddSumsTo(total, c, f));
  }
#endif
  PackRowPairs(pixels, c, d, d_pairs);
  Bf16AddProducts(c, pairs, f, d_pairs, dy_pairs, total);
}
#else
#define S9_BF16_DOT 0
#endif

// x rounded to bfloat16: its upper 16 bits, to nearest, ties to even; NaN stays NaN.
inline uint16_t Bf16Bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// x[0, n) rounded to bfloat16, as float32, into out (which may be x).
void RoundToBf16(int64_t n, const float* x, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(Bf16Bits(x[i])) << 16;
    std::memcpy(out + i, &u, sizeof u);
  }
}

// src[0, n) as the float32 kernels read it: itself, or with bf16 rounded into
// buffers[at, at + n).
inline const float* Operand(bool bf16, int64_t n, const float* src,
                            std::vector<float>& buffers, int64_t at) {
  if (!bf16) return src;
  RoundToBf16(n, src, buffers.data() + at);
  return buffers.data() + at;
}

// A conv's kernel, (taps, rows, cols) contracted over its rows, as its products read it,
// prepared once per call: as given; with bf16, each tap's (rows, cols) packed in row pairs,
// `tap_size` values a tap (AVX512-BF16), or rounded (elsewhere).
struct ConvKernel {
  ConvKernel(const float* weights, int64_t taps, int64_t rows, int64_t cols, bool bf16)
      : bf16(bf16), w(weights), tap_size(PackedTapSize(rows, cols, bf16)),
        packed_buffer(taps * tap_size), packed(packed_buffer.get()) {
    if (!bf16) return;
#if S9_BF16_DOT
    for (int64_t t = 0; t < taps; ++t)
      PackRowPairs(rows, cols, weights + t * rows * cols, packed + t * tap_size);
#else
    rounded.resize(taps * rows * cols);
    RoundToBf16(taps * rows * cols, weights, rounded.data());
    w = rounded.data();
#endif
  }
  // One tap's packed pairs, with AVX512-BF16 (else none).
  static int64_t PackedTapSize([[maybe_unused]] int64_t rows, [[maybe_unused]] int64_t cols,
                               [[maybe_unused]] bool bf16) {
#if S9_BF16_DOT
    if (bf16) return (rows + 1) / 2 * RoundUp16(cols) * 2;
#endif
    return 0;
  }

  bool bf16;
  const float* w;  // The float32 kernels' operand.
  int64_t tap_size;
  std::vector<float> rounded;  // bf16 without AVX512-BF16.
  // bf16 with it, kept from call to call (a handler holds one ConvKernel at a time): a
  // fresh vector each call was ~0.5% of fast.py's step in malloc.
  const CallBuffer<uint16_t, kKernelSlot> packed_buffer;
  uint16_t* packed;
};

// One thread's buffers for the bf16 products: operands in pairs, or a rounded dy.
struct PointwiseScratch {
  std::vector<uint16_t> pairs;
  std::vector<float> rounded;

  // x[0, n) rounded to bfloat16 into `rounded` (the float32 kernels' bf16 operand).
  const float* Rounded(int64_t n, const float* x) {
    rounded.resize(n);
    RoundToBf16(n, x, rounded.data());
    return rounded.data();
  }
};

// One image's y (pixels, f) = d (pixels, c) @ kernel (c, f), gp the 1x1's geometry; with
// bf16, d may be rounded in place.
void PointwiseForwardImage(const Geometry& gp, int64_t f, const ConvKernel& kernel,
                           float* d, PointwiseScratch& scratch, float* y) {
#if S9_BF16_DOT
  if (kernel.bf16) return Bf16Pointwise(gp.h * gp.w, gp.c, f, d, kernel.packed,
                                        scratch.pairs, y);
#else
  if (kernel.bf16) RoundToBf16(gp.h * gp.w * gp.c, d, d);
#endif
  DenseForwardImage(gp, f, d, kernel.w, nullptr, y);
}

// One image's 1x1 input gradient for dy (pixels, f), written to dd (pixels, c):
// dd = dy @ w^T, `transposed` the kernel as (f, c). Taps in the padding (none for a 1x1)
// add to `trash`.
void PointwiseInputGradImage(const Geometry& gp, int64_t f, const ConvKernel& transposed,
                             const float* dy, PointwiseScratch& scratch, float* trash,
                             float* dd) {
  const int64_t pixels = gp.h * gp.w;
#if S9_BF16_DOT
  if (transposed.bf16) return Bf16Pointwise(pixels, f, gp.c, dy, transposed.packed,
                                            scratch.pairs, dd);
#else
  if (transposed.bf16) dy = scratch.Rounded(pixels * f, dy);
#endif
  DenseInputGradImage(gp, f, dy, transposed.w, trash, dd);
}

// The 1x1's kernel gradient over `pixels` rows, d (pixels, c)^T @ dy (pixels, f), added
// to total (c, f): summed in float32 over the rows, added in float64. The rows may span
// several images (a 1x1 conv sees each pixel alone), so its c x f sums, which cost as
// much as the products on a 4x4 map, are written once for all of them. With bf16, d may
// be rounded in place.
void PointwiseKernelGrad(int64_t pixels, int64_t c, int64_t f, bool bf16, float* d,
                         const float* dy, PointwiseScratch& scratch, double* total) {
#if S9_BF16_DOT
  if (bf16) return Bf16PointwiseKernelGrad(pixels, c, f, d, dy, scratch.pairs, total);
#else
  if (bf16) {
    RoundToBf16(pixels * c, d, d);
    dy = scratch.Rounded(pixels * f, dy);
  }
#endif
  const Geometry rows{1, pixels, 1, c, 1, 1, pixels, 1, 1, 1, 1, 1, 0, 0};
  DenseKernelGradImage(rows, f, d, dy, total);
}

// The dense convs with bfloat16 operands (attribute `bf16` = 1), as the separable ops'
// 1x1: x (or dy) and the kernel rounded to bfloat16, their products summed in float32.
// With AVX512-BF16 the forward and the input gradient contract two channels per dot
// product, the kernel gradient two output pixels; on AMX tiles the same pairs, 16 x 16
// sums at a time (AmxDenseForwardImage, PackTapPairs). On a 2-core Xeon, fast.py's
// Conv_1 (128 x 16 x 16 x 24 -> 48) took, against the float32 kernels: forward 0.7-0.8
// ms against 2.5-3.3, input gradient 0.7-1.0 against 3.5-3.8, kernel gradient ~1.8
// against 2.9-3.2 (the packing its tiles need is most of it). Other CPUs run the
// float32 kernels on rounded operands.

#if S9_BF16_DOT
// The size of one axis of a conv's input padded so every index it reads, from -lo to
// the last output's last tap, lies inside: the image then sits at lo.
inline int64_t PaddedSize(int64_t in, int64_t out, int64_t k, int64_t s, int64_t d,
                          int64_t lo) {
  return std::max(in + lo, (out - 1) * s + (k - 1) * d + 1);
}

// One image x (h, w, c) as bfloat16 channel pairs into out (hp, wp, c2) at (ph, pw): the
// border is not written (zero from its allocation, the same for every image).
void PackPaddedImage(const Geometry& g, int64_t wp, const float* x, uint16_t* out) {
  const int64_t c2 = g.c + (g.c & 1);
  for (int64_t r = 0; r < g.h; ++r)
    PackChannelPairs(g.w, g.c, x + r * g.w * g.c, out + ((r + g.ph) * wp + g.pw) * c2);
}

// One image's y, as DenseForwardImage, from xp (PackPaddedImage, width wp) and the
// kernel packed per tap: P pixels of an output row by up to 3 vectors of 16 channels.
void Bf16DenseForwardImage(const Geometry& g, int64_t cout, int64_t wp, const uint16_t* xp,
                           const ConvKernel& kernel, float* y) {
  const int64_t c2 = g.c + (g.c & 1), c16 = RoundUp16(cout);
  for (int64_t p = 0; p < g.oh; ++p) {
    ForBlocksOf8(g.ow, [&](auto pixels, int64_t q0) {
      constexpr int P = decltype(pixels)::value;
      const uint16_t* src[kMaxTaps][P];
      int64_t live[kMaxTaps], num_live = 0;
      for (int64_t i = 0; i < g.kh; ++i) {
        const bool row_in = g.InRow(p, i) >= 0;
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t t = i * g.kw + j;
          bool reads = false;
          for (int k = 0; k < P; ++k) {
            reads |= row_in && g.InCol(q0 + k, j) >= 0;
            src[t][k] = xp + ((p * g.sh + i * g.dh) * wp + (q0 + k) * g.sw + j * g.dw) * c2;
          }
          if (reads) live[num_live++] = t;  // Taps wholly in the padding add nothing.
        }
      }
      ForVectorBlocks(c16 / 16, [&](auto vectors, int64_t v0) {
        constexpr int NB = decltype(vectors)::value;
        __m512 acc[P][NB];
        for (int k = 0; k < P; ++k)
          for (int v = 0; v < NB; ++v) acc[k][v] = _mm512_setzero_ps();
        for (int64_t l = 0; l < num_live; ++l) {
          const int64_t t = live[l];
          Bf16Accumulate(src[t], 1, c2 / 2, kernel.packed + t * kernel.tap_size + 32 * v0,
                         2 * c16, acc);
        }
        for (int k = 0; k < P; ++k)
          for (int v = 0; v < NB; ++v) {
            const int64_t c0 = (v0 + v) * 16;
            _mm512_mask_storeu_ps(y + (p * g.ow + q0 + k) * cout + c0, TailMask(cout - c0),
                                  acc[k][v]);
          }
      });
    });
  }
}

#if S9_AMX
// One image's y, as DenseForwardImage, on AMX tiles: per 16 pixels of an output row, the
// sum over taps of their inputs' channel pairs in xp (PackPaddedImage, width wp; rows
// of a block past the row's end read on, and their sums are dropped) times the tap's
// packed kernel. xp needs 16 * g.sw pixels of slack past its end.
void AmxDenseForwardImage(const Geometry& g, int64_t cout, int64_t wp, const uint16_t* xp,
                          const ConvKernel& kernel, float* y) {
  const int64_t c2 = g.c + (g.c & 1), pairs = c2 / 2, c16 = RoundUp16(cout);
  const int64_t tiles = c16 / 16, a_stride = 2 * g.sw * c2;
  for (int64_t p = 0; p < g.oh; ++p)
    for (int64_t q0 = 0; q0 < g.ow; q0 += 16) {
      const int64_t n = std::min<int64_t>(16, g.ow - q0);
      for (int64_t t0 = 0; t0 < tiles; t0 += 4) {
        const int64_t nt = std::min<int64_t>(4, tiles - t0);
        AmxZero();
        for (int64_t i = 0; i < g.kh; ++i)
          for (int64_t j = 0; j < g.kw; ++j)
            AmxAccumulate(xp + ((p * g.sh + i * g.dh) * wp + q0 * g.sw + j * g.dw) * c2,
                          a_stride, kernel.packed + (i * g.kw + j) * kernel.tap_size +
                          32 * t0, 4 * c16, pairs, nt);
        float* out = y + (p * g.ow + q0) * cout + 16 * t0;
        AmxStore(n, nt, [&](int64_t r, int64_t c, __m512 v) {
          _mm512_mask_storeu_ps(out + r * cout + c, TailMask(cout - 16 * t0 - c), v);
        });
      }
    }
}
#endif

// The conv of every image of x (g) with the packed kernel into y (g.n, g.oh, g.ow, cout),
// each thread padding and packing one image at a time.
void Bf16DenseConv(ffi::ThreadPool& pool, const Geometry& g, int64_t cout, const float* x,
                   const ConvKernel& kernel, float* y) {
  const int64_t hp = PaddedSize(g.h, g.oh, g.kh, g.sh, g.dh, g.ph);
  const int64_t wp = PaddedSize(g.w, g.ow, g.kw, g.sw, g.dw, g.pw);
  const int64_t c2 = g.c + (g.c & 1), slack = 16 * g.sw * c2;  // AmxDenseForwardImage's.
  const int64_t padded = hp * wp * c2 + slack, chunks = NumChunks(pool, g.n);
  std::vector<uint16_t> images(chunks * padded, 0);  // Each thread's padded image.
  ParallelFor(pool, g.n, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    uint16_t* xp = images.data() + chunk * padded;
#if S9_AMX
    if (AmxUsable()) {
      AmxConfigure(c2 / 2);
      for (int64_t n = begin; n < end; ++n) {
        PackPaddedImage(g, wp, x + n * g.h * g.w * g.c, xp);
        AmxDenseForwardImage(g, cout, wp, xp, kernel, y + n * g.oh * g.ow * cout);
      }
      return _tile_release();
    }
#endif
    for (int64_t n = begin; n < end; ++n) {
      PackPaddedImage(g, wp, x + n * g.h * g.w * g.c, xp);
      Bf16DenseForwardImage(g, cout, wp, xp, kernel, y + n * g.oh * g.ow * cout);
    }
  });
}

// One image's input gradient, as DenseInputGradImage, from dyp (dy as bfloat16 channel
// pairs, (oh * ow, c2)) and the kernel as (taps, cout, cin) packed per tap; taps in the
// padding add to `trash` (cin floats).
void Bf16DenseInputGradImage(const Geometry& g, int64_t cout, const uint16_t* dyp,
                             const ConvKernel& transposed, float* trash, float* dx) {
  const int64_t cin = g.c, cout2 = cout + (cout & 1), c16 = RoundUp16(cin);
  std::fill(dx, dx + g.h * g.w * cin, 0.0f);
  for (int64_t p = 0; p < g.oh; ++p) {
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t r = g.InRow(p, i);
      if (r < 0) continue;
      ForBlocksOf8(g.ow, [&](auto pixels, int64_t q0) {
        constexpr int P = decltype(pixels)::value;
        const uint16_t* grad[P];
        for (int k = 0; k < P; ++k) grad[k] = dyp + (p * g.ow + q0 + k) * cout2;
        for (int64_t j = 0; j < g.kw; ++j) {
          float* dst[P];
          bool writes = false;
          for (int k = 0; k < P; ++k) {
            const int64_t s = g.InCol(q0 + k, j);
            writes |= s >= 0;
            dst[k] = s >= 0 ? dx + (r * g.w + s) * cin : trash;
          }
          if (!writes) continue;
          const uint16_t* wtap = transposed.packed + (i * g.kw + j) * transposed.tap_size;
          ForVectorBlocks(c16 / 16, [&](auto vectors, int64_t v0) {
            constexpr int NB = decltype(vectors)::value;
            __m512 acc[P][NB];
            for (int k = 0; k < P; ++k)
              for (int v = 0; v < NB; ++v) acc[k][v] = _mm512_setzero_ps();
            Bf16Accumulate(grad, 1, cout2 / 2, wtap + 32 * v0, 2 * c16, acc);
            for (int k = 0; k < P; ++k)
              for (int v = 0; v < NB; ++v) {
                const int64_t c0 = (v0 + v) * 16;
                const __mmask16 m = TailMask(cin - c0);
                float* out = dst[k] + c0;
                _mm512_mask_storeu_ps(out, m,
                                      _mm512_add_ps(_mm512_maskz_loadu_ps(m, out), acc[k][v]));
              }
          });
        }
      });
    }
  }
}

// Adds one image's kernel gradient to total (kh, kw, cin, cout), as DenseKernelGradImage,
// from dyp (dy's output pixels in row pairs, PackRowPairs): per tap, the input pixels
// those pairs read (zero in the padding) are packed the same way into xt.
void Bf16DenseKernelGradImage(const Geometry& g, int64_t cout, const float* x,
                              const uint16_t* dyp, uint16_t* xt, double* total) {
  const int64_t pixels = g.oh * g.ow, cin = g.c;
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) {
      PackRowPairsOf(pixels, cin, [&](int64_t o) -> const float* {
        const int64_t r = g.InRow(o / g.ow, i), s = g.InCol(o % g.ow, j);
        return r >= 0 && s >= 0 ? x + (r * g.w + s) * cin : nullptr;
      }, xt);
      Bf16AddProducts(cin, (pixels + 1) / 2, cout, xt, dyp,
                      total + (i * g.kw + j) * cin * cout);
    }
}
#if S9_AMX
// One image x's taps side by side in pixel pairs, the kernel gradient's right operand on
// the tiles: dst (ceil(oh * ow / 2), ld, 2) bfloat16 with dst[k, t * cin + c] the pair
// of output pixels 2k and 2k + 1's inputs at tap t, channel c, zero in the padding and
// past the pixels. Columns from taps * cin to ld are not written.
void PackTapPairs(const Geometry& g, const float* x, int64_t ld, uint16_t* dst) {
  const int64_t cin = g.c;
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) {
      uint16_t* tap = dst + 2 * (i * g.kw + j) * cin;
      ForRowPairs(g.oh * g.ow, cin, [&](int64_t o) -> const float* {
        const int64_t r = g.InRow(o / g.ow, i), s = g.InCol(o % g.ow, j);
        return r >= 0 && s >= 0 ? x + (r * g.w + s) * cin : nullptr;
      }, [&](int64_t pair, int64_t c0, __m512i v) {
        _mm512_mask_storeu_epi32(tap + 2 * (pair * ld + c0), TailMask(cin - c0), v);
      });
    }
}
#endif
#endif

ffi::Error DenseForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> y,
                        int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t ph, int64_t pw,
                        int64_t ph_hi, int64_t pw_hi, int64_t bf16) {
  constexpr char op[] = "s9_dense_forward";
  auto xd = x.dimensions();
  auto kd = kernel.dimensions();
  auto yd = y->dimensions();
  S9_RETURN_IF_ERROR(CheckRank(op, "x", xd, 4, kNhwc));
  S9_RETURN_IF_ERROR(CheckRank(op, "kernel", kd, 4, "(KH, KW, CIN, COUT)"));
  S9_RETURN_IF_ERROR(CheckRank(op, "y", yd, 4, kNhwc));
  S9_RETURN_IF_ERROR(CheckSame(op, "kernel input channels", kd[2], "x channels", xd[3]));
  S9_RETURN_IF_ERROR(CheckSame(op, "y batch", yd[0], "x batch", xd[0]));
  S9_RETURN_IF_ERROR(CheckSame(op, "y channels", yd[3], "kernel output channels", kd[3]));
  const Geometry g = MakeGeometry(xd, kd[0], kd[1], yd[1], yd[2], sh, sw, dh, dw, ph, pw);
  S9_RETURN_IF_ERROR(CheckConv(op, g, ph_hi, pw_hi));
  const int64_t cout = kd[3], image = g.h * g.w * g.c, out_image = g.oh * g.ow * cout;
  const ConvKernel w(kernel.typed_data(), g.kh * g.kw, g.c, cout, bf16);
  const int64_t chunks = NumChunks(pool, g.n);
#if S9_BF16_DOT
  if (bf16) {
    Bf16DenseConv(pool, g, cout, x.typed_data(), w, y->typed_data());
    return ffi::Error::Success();
  }
#endif
  const std::vector<float> zeros(g.c, 0.0f);
  std::vector<float> rounded(bf16 ? chunks * image : 0);  // Each thread's rounded image.
  ParallelFor(pool, g.n, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* xn = Operand(bf16, image, x.typed_data() + n * image, rounded, chunk * image);
      DenseForwardImage(g, cout, xn, w.w, zeros.data(), y->typed_data() + n * out_image);
    }
  });
  return ffi::Error::Success();
}

ffi::Error DenseInputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                          ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> dx,
                          int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t ph,
                          int64_t pw, int64_t ph_hi, int64_t pw_hi, int64_t bf16) {
  constexpr char op[] = "s9_dense_input_grad";
  auto xd = dx->dimensions();
  auto kd = kernel.dimensions();
  auto yd = dy.dimensions();
  S9_RETURN_IF_ERROR(CheckRank(op, "dy", yd, 4, kNhwc));
  S9_RETURN_IF_ERROR(CheckRank(op, "kernel", kd, 4, "(KH, KW, CIN, COUT)"));
  S9_RETURN_IF_ERROR(CheckRank(op, "dx", xd, 4, kNhwc));
  S9_RETURN_IF_ERROR(CheckSame(op, "dx batch", xd[0], "dy batch", yd[0]));
  S9_RETURN_IF_ERROR(CheckSame(op, "kernel output channels", kd[3], "dy channels", yd[3]));
  S9_RETURN_IF_ERROR(CheckSame(op, "dx channels", xd[3], "kernel input channels", kd[2]));
  const Geometry g = MakeGeometry(xd, kd[0], kd[1], yd[1], yd[2], sh, sw, dh, dw, ph, pw);
  S9_RETURN_IF_ERROR(CheckConv(op, g, ph_hi, pw_hi));
  const int64_t cout = kd[3], image = g.h * g.w * g.c, out_pixels = g.oh * g.ow;
  const int64_t taps = g.kh * g.kw;
  const CallBuffer<float, kTransposedSlot> wt_buffer(taps * cout * g.c);
  float* wt = wt_buffer.get();
  TransposeKernel(kernel.typed_data(), taps, g.c, cout, wt);
#if S9_BF16_DOT
  // Unstrided, the input gradient is the conv of dy, padded by (k - 1) * d - lo, with the
  // kernel transposed and its taps reversed: the forward's kernel, whose sums stay in
  // registers, where the strided form adds each tap's products to dx in memory.
  const int64_t th = (g.kh - 1) * g.dh - g.ph, tw = (g.kw - 1) * g.dw - g.pw;
  if (bf16 && g.sh == 1 && g.sw == 1 && th >= 0 && tw >= 0) {
    const int64_t tap = cout * g.c;
    for (int64_t t = 0; t < taps / 2; ++t)  // Taps reversed.
      std::swap_ranges(wt + t * tap, wt + (t + 1) * tap, wt + (taps - 1 - t) * tap);
    const ConvKernel flipped(wt, taps, cout, g.c, true);
    const Geometry gt{g.n, g.oh, g.ow, cout, g.kh, g.kw, g.h, g.w, 1, 1, g.dh, g.dw, th, tw};
    Bf16DenseConv(pool, gt, g.c, dy.typed_data(), flipped, dx->typed_data());
    return ffi::Error::Success();
  }
#endif
  const ConvKernel transposed(wt, taps, cout, g.c, bf16);
  const int64_t chunks = NumChunks(pool, g.n);
  std::vector<float> trash(chunks * g.c);
#if S9_BF16_DOT
  if (bf16) {
    const int64_t pairs = out_pixels * (cout + (cout & 1));
    std::vector<uint16_t> grads(chunks * pairs);  // Each thread's dy in channel pairs.
    ParallelFor(pool, g.n, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
      uint16_t* dyp = grads.data() + chunk * pairs;
      for (int64_t n = begin; n < end; ++n) {
        PackChannelPairs(out_pixels, cout, dy.typed_data() + n * out_pixels * cout, dyp);
        Bf16DenseInputGradImage(g, cout, dyp, transposed, trash.data() + chunk * g.c,
                                dx->typed_data() + n * image);
      }
    });
    return ffi::Error::Success();
  }
#endif
  const int64_t grad = out_pixels * cout;
  std::vector<float> rounded(bf16 ? chunks * grad : 0);  // Each thread's rounded dy.
  ParallelFor(pool, g.n, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* dyn = Operand(bf16, grad, dy.typed_data() + n * grad, rounded, chunk * grad);
      DenseInputGradImage(g, cout, dyn, transposed.w, trash.data() + chunk * g.c,
                          dx->typed_data() + n * image);
    }
  });
  return ffi::Error::Success();
}

ffi::Error DenseKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dkernel,
                           int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t ph,
                           int64_t pw, int64_t ph_hi, int64_t pw_hi, int64_t bf16) {
  constexpr char op[] = "s9_dense_kernel_grad";
  auto xd = x.dimensions();
  auto kd = dkernel->dimensions();
  auto yd = dy.dimensions();
  S9_RETURN_IF_ERROR(CheckRank(op, "x", xd, 4, kNhwc));
  S9_RETURN_IF_ERROR(CheckRank(op, "dy", yd, 4, kNhwc));
  S9_RETURN_IF_ERROR(CheckRank(op, "dkernel", kd, 4, "(KH, KW, CIN, COUT)"));
  S9_RETURN_IF_ERROR(CheckSame(op, "dy batch", yd[0], "x batch", xd[0]));
  S9_RETURN_IF_ERROR(CheckSame(op, "dkernel input channels", kd[2], "x channels", xd[3]));
  S9_RETURN_IF_ERROR(CheckSame(op, "dkernel output channels", kd[3], "dy channels", yd[3]));
  const Geometry g = MakeGeometry(xd, kd[0], kd[1], yd[1], yd[2], sh, sw, dh, dw, ph, pw);
  S9_RETURN_IF_ERROR(CheckConv(op, g, ph_hi, pw_hi));
  const int64_t cout = kd[3], size = g.kh * g.kw * g.c * cout;
  const int64_t chunks = NumChunks(pool, g.n);
  const int64_t image = g.h * g.w * g.c, grad = g.oh * g.ow * cout;
  std::vector<double> partial(chunks * size, 0.0);
#if S9_AMX
  if (bf16 && AmxUsable()) {
    // dkernel's transpose as one product over pixel pairs per image: dy^T (output
    // channels down, pixel pairs across) times the image's taps side by side.
    const int64_t pairs = (g.oh * g.ow + 1) / 2, cols = g.kh * g.kw * g.c;
    const int64_t ld = RoundUp16(cols), dyt_size = pairs * RoundUp16(cout) * 2;
    std::vector<uint16_t> packed(chunks * (dyt_size + pairs * ld * 2));
    ParallelFor(pool, g.n, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
      uint16_t* dyt = packed.data() + chunk * (dyt_size + pairs * ld * 2);
      uint16_t* taps = dyt + dyt_size;
      std::vector<double> transposed(cout * ld, 0.0);  // The image sums, added up.
      AmxConfigure(pairs);
      for (int64_t n = begin; n < end; ++n) {
        PackRowPairsTransposed(g.oh * g.ow, cout, dy.typed_data() + n * grad, dyt);
        PackTapPairs(g, x.typed_data() + n * image, ld, taps);
        AmxProducts(RoundUp16(cout), pairs, cols, dyt, pairs, taps,
                    [&](int64_t r, int64_t c0, __m512 v) {
                      if (r >= cout) return;
                      double* sums = transposed.data() + r * ld + c0;
                      _mm512_storeu_pd(sums, _mm512_add_pd(_mm512_loadu_pd(sums),
                          _mm512_cvtps_pd(_mm512_castps512_ps256(v))));
                      _mm512_storeu_pd(sums + 8, _mm512_add_pd(_mm512_loadu_pd(sums + 8),
                          _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1))));
                    });
      }
      _tile_release();
      double* total = partial.data() + chunk * size;
      for (int64_t r = 0; r < cout; ++r)
        for (int64_t c = 0; c < cols; ++c) total[c * cout + r] = transposed[r * ld + c];
    });
    ReducePartials(partial.data(), chunks, size, dkernel->typed_data());
    return ffi::Error::Success();
  }
#endif
#if S9_BF16_DOT
  if (bf16) {
    const int64_t pairs = (g.oh * g.ow + 1) / 2;
    // Each thread's dy and one tap's x, in pixel pairs.
    const int64_t per_chunk = pairs * (RoundUp16(cout) + RoundUp16(g.c)) * 2;
    std::vector<uint16_t> packed(chunks * per_chunk);
    ParallelFor(pool, g.n, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
      uint16_t* dyp = packed.data() + chunk * per_chunk;
      uint16_t* xt = dyp + pairs * RoundUp16(cout) * 2;
      for (int64_t n = begin; n < end; ++n) {
        PackRowPairs(g.oh * g.ow, cout, dy.typed_data() + n * grad, dyp);
        Bf16DenseKernelGradImage(g, cout, x.typed_data() + n * image, dyp, xt,
                                 partial.data() + chunk * size);
      }
    });
    ReducePartials(partial.data(), chunks, size, dkernel->typed_data());
    return ffi::Error::Success();
  }
#endif
  // Each thread's rounded image and dy.
  std::vector<float> rounded(bf16 ? chunks * (image + grad) : 0);
  ParallelFor(pool, g.n, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    const int64_t at = chunk * (image + grad);
    for (int64_t n = begin; n < end; ++n) {
      const float* xn = Operand(bf16, image, x.typed_data() + n * image, rounded, at);
      const float* dyn = Operand(bf16, grad, dy.typed_data() + n * grad, rounded, at + image);
      DenseKernelGradImage(g, cout, xn, dyn, partial.data() + chunk * size);
    }
  });
  ReducePartials(partial.data(), chunks, size, dkernel->typed_data());
  return ffi::Error::Success();
}

// Adds to total (2, c) the sums over `rows` rows of `w` pixels of b, and of (a - shift)
// * b, per channel (null shift: 0): each row's in float32, in registers (kept in memory,
// each pixel's adds waited on the last pixel's stores), added in float64.
void AddRowSums(int64_t rows, int64_t w, int64_t c, const float* as, const float* bs,
                const float* __restrict shifts, double* __restrict total) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict a_row = as + r * w * c;
    const float* __restrict b_row = bs + r * w * c;
    ForChannelBlocks(c, [&](auto block, int64_t c0) {
      constexpr int B = decltype(block)::value;
      const typename Vec<B>::type s =
          shifts ? Load<B>(shifts + c0) : typename Vec<B>::type{};
      typename Vec<B>::type sum_b = {}, sum_ab = {};
      for (int64_t q = 0; q < w; ++q) {
        const typename Vec<B>::type bq = Load<B>(b_row + q * c + c0);
        sum_b += bq;
        sum_ab += (Load<B>(a_row + q * c + c0) - s) * bq;
      }
      for (int k = 0; k < B; ++k) {
        total[c0 + k] += sum_b[k];
        total[c + c0 + k] += sum_ab[k];
      }
    });
  }
}

// With `sums` (2, F), also y's channel sums, ChannelSums(y, y)'s: BatchNorm's statistics
// of y without a pass over it (each image's rows summed as it is written, in cache, in
// ChannelSums' order: the same figures where the batch splits into the same chunks of
// whole images); (0, F): none.
ffi::Error SeparableForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> prologue, ffi::Buffer<ffi::F32> depthwise,
                            ffi::Buffer<ffi::F32> pointwise, ffi::ResultBuffer<ffi::F32> y,
                            ffi::ResultBuffer<ffi::F32> sums, int64_t sh, int64_t sw,
                            int64_t dh, int64_t dw, int64_t ph, int64_t pw, int64_t ph_hi,
                            int64_t pw_hi, int64_t bf16) {
  constexpr char op[] = "s9_separable_forward";
  auto xd = x.dimensions();
  auto dd = depthwise.dimensions();
  auto pd = pointwise.dimensions();
  auto yd = y->dimensions();
  S9_RETURN_IF_ERROR(CheckSeparable(op, xd, dd, pd, yd, "y"));
  S9_RETURN_IF_ERROR(CheckPrologue(op, prologue.dimensions(), xd[3]));
  const Geometry g = MakeGeometry(xd, dd[0], dd[1], yd[1], yd[2], sh, sw, dh, dw, ph, pw);
  S9_RETURN_IF_ERROR(CheckConv(op, g, ph_hi, pw_hi));
  const Geometry gp = PointwiseGeometry(g);
  const bool normalise = prologue.dimensions()[0] > 0;
  const int64_t f = pd[1], mid = g.oh * g.ow * g.c, image = g.h * g.w * g.c;
  S9_RETURN_IF_ERROR(CheckRowsOrNone(op, "sums", sums->dimensions(), 2, f));
  const bool with_sums = sums->dimensions()[0] == 2;
  const TapIndex index = ForwardIndex(g);
  const ConvKernel kernel(pointwise.typed_data(), 1, g.c, f, bf16);
  const int64_t chunks = NumChunks(pool, g.n);
  // Each thread's depthwise output, and its normalised input with a prologue.
  const int64_t per_chunk = mid + (normalise ? image : 0);
  const CallBuffer<float, kBetweenSlot> between_buffer(chunks * per_chunk);
  float* between = between_buffer.get();
  const CallBuffer<double, kPartialSlot> partial_buffer(with_sums ? chunks * 2 * f : 0, true);
  double* partial = partial_buffer.get();
  ParallelFor(pool, g.n, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    float* d = between + chunk * per_chunk;
    float* z = d + mid;
    thread_local PointwiseScratch scratch;
    for (int64_t n = begin; n < end; ++n) {
      const float* xi = x.typed_data() + n * image;
      if (normalise) {
        NormaliseRelu(g.h * g.w, g.c, xi, prologue.typed_data(), z);
        xi = z;
      }
      GatherTaps(g, index, xi, depthwise.typed_data(), d);
      float* yi = y->typed_data() + n * g.oh * g.ow * f;
      PointwiseForwardImage(gp, f, kernel, d, scratch, yi);
      if (with_sums) AddRowSums(g.oh, g.ow, f, yi, yi, nullptr, partial + chunk * 2 * f);
    }
  });
  if (with_sums) ReducePartials(partial, chunks, 2 * f, sums->typed_data());
  return ffi::Error::Success();
}

// All the gradients. Per image: the depthwise output again (from x, or from the
// prologue's output, computed again too), the 1x1's input gradient (the depthwise
// output's gradient), then the depthwise input and kernel gradients from that; with a
// prologue, its input gradient and sums from the last. The 1x1's kernel gradient, per
// group of images, from their depthwise outputs.
ffi::Error SeparableBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> prologue, ffi::Buffer<ffi::F32> depthwise,
                             ffi::Buffer<ffi::F32> pointwise, ffi::Buffer<ffi::F32> dy,
                             ffi::ResultBuffer<ffi::F32> dx,
                             ffi::ResultBuffer<ffi::F32> dprologue,
                             ffi::ResultBuffer<ffi::F32> ddepthwise,
                             ffi::ResultBuffer<ffi::F32> dpointwise, int64_t sh, int64_t sw,
                             int64_t dh, int64_t dw, int64_t ph, int64_t pw, int64_t ph_hi,
                             int64_t pw_hi, int64_t bf16) {
  constexpr char op[] = "s9_separable_backward";
  auto xd = x.dimensions();
  auto dd = depthwise.dimensions();
  auto pd = pointwise.dimensions();
  auto yd = dy.dimensions();
  S9_RETURN_IF_ERROR(CheckSeparable(op, xd, dd, pd, yd, "dy"));
  S9_RETURN_IF_ERROR(CheckPrologue(op, prologue.dimensions(), xd[3]));
  S9_RETURN_IF_ERROR(CheckShape(op, "dx", dx->dimensions(), "x", xd));
  const bool normalise = prologue.dimensions()[0] > 0;
  const int64_t c = xd[3], sums = normalise ? 2 * c : 0;
  auto dpd = dprologue->dimensions();
  if (dpd.size() != 2 || dpd[0] != (normalise ? 2 : 0) || dpd[1] != c) {
    return Invalid(op, "dprologue must have shape (", normalise ? 2 : 0, ", ", c, "), got ",
                   ShapeString(dpd));
  }
  S9_RETURN_IF_ERROR(CheckShape(op, "ddepthwise", ddepthwise->dimensions(), "depthwise", dd));
  S9_RETURN_IF_ERROR(CheckShape(op, "dpointwise", dpointwise->dimensions(), "pointwise", pd));
  const Geometry g = MakeGeometry(xd, dd[0], dd[1], yd[1], yd[2], sh, sw, dh, dw, ph, pw);
  S9_RETURN_IF_ERROR(CheckConv(op, g, ph_hi, pw_hi));
  const Geometry gp = PointwiseGeometry(g);
  const int64_t f = pd[1], mid = g.oh * g.ow * c, image = g.h * g.w * c;
  const int64_t depthwise_size = g.kh * g.kw * c, pointwise_size = c * f;
  const int64_t totals_size = depthwise_size + pointwise_size + sums;
  // The 1x1 kernel as (f, c), for its input gradient.
  const CallBuffer<float, kTransposedSlot> transposed_buffer(c * f);
  float* transposed = transposed_buffer.get();
  TransposeKernel(pointwise.typed_data(), 1, c, f, transposed);
  const ConvKernel transposed_kernel(transposed, 1, f, c, bf16);
  const TapIndex input_index = InputGradIndex(g), forward = ForwardIndex(g);
  const int64_t chunks = NumChunks(pool, g.n);
  const CallBuffer<double, kPartialSlot> partial_buffer(chunks * totals_size, true);
  double* partial = partial_buffer.get();
  // The 1x1's kernel gradient is summed over groups of images of at least
  // kKernelGradPixels pixels together (PointwiseKernelGrad), so each thread keeps the
  // depthwise outputs of a group, and one image's depthwise output gradient; with a
  // prologue, also its normalised input and that input's gradient.
  const int64_t pixels = g.oh * g.ow;
  const int64_t group = std::max<int64_t>(1, kKernelGradPixels / pixels);
  const int64_t per_chunk = (group + 1) * mid + (normalise ? 2 * image : 0);
  const CallBuffer<float, kBetweenSlot> between_buffer(chunks * per_chunk);
  const CallBuffer<float, kTrashSlot> trash_buffer(chunks * c);
  float* between = between_buffer.get();
  float* trash = trash_buffer.get();
  ParallelFor(pool, g.n, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    float* d = between + chunk * per_chunk;  // The group's depthwise outputs.
    float* dd_image = d + group * mid;
    float* z = dd_image + mid;
    float* dz = z + image;
    double* total_depthwise = partial + chunk * totals_size;
    double* total_pointwise = total_depthwise + depthwise_size;
    double* total_prologue = total_pointwise + pointwise_size;
    thread_local PointwiseScratch scratch;
    for (int64_t n0 = begin; n0 < end; n0 += group) {
      const int64_t n1 = std::min(end, n0 + group);
      for (int64_t n = n0; n < n1; ++n) {
        const float* xi = x.typed_data() + n * image;
        const float* input = xi;  // What the depthwise conv reads.
        float* dxi = dx->typed_data() + n * image;
        if (normalise) {
          NormaliseRelu(g.h * g.w, c, xi, prologue.typed_data(), z);
          input = z;
        }
        GatherTaps(g, forward, input, depthwise.typed_data(), d + (n - n0) * mid);
        PointwiseInputGradImage(gp, f, transposed_kernel, dy.typed_data() + n * pixels * f,
                                scratch, trash + chunk * c, dd_image);
        GatherTaps(g, input_index, dd_image, depthwise.typed_data(), normalise ? dz : dxi);
        ImageKernelGrad(g, forward, input, dd_image, total_depthwise);
        if (normalise) {
          NormaliseReluGrad(g.h, g.w, c, xi, z, dz, prologue.typed_data(), dxi,
                            total_prologue);
        }
      }
      PointwiseKernelGrad((n1 - n0) * pixels, c, f, transposed_kernel.bf16, d,
                          dy.typed_data() + n0 * pixels * f, scratch, total_pointwise);
    }
  });
  const CallBuffer<float, kTotalsSlot> totals_buffer(totals_size);
  float* totals = totals_buffer.get();
  ReducePartials(partial, chunks, totals_size, totals);
  std::copy(totals, totals + depthwise_size, ddepthwise->typed_data());
  std::copy(totals + depthwise_size, totals + depthwise_size + pointwise_size,
            dpointwise->typed_data());
  std::copy(totals + depthwise_size + pointwise_size, totals + totals_size,
            dprologue->typed_data());
  return ffi::Error::Success();
}

// out[0] = sum over n, h, w of b; out[1] = sum of (a - shift) * b (per channel):
// BatchNorm's statistics (a = b = x, shift 0) and its gradient sums (a = x, b = dy,
// shift = the batch mean) in one pass. Each image row's sum is float32, rows are added
// in float64.
ffi::Error ChannelSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                       ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> shift,
                       ffi::ResultBuffer<ffi::F32> out) {
  constexpr char op[] = "s9_channel_sums";
  auto d = a.dimensions();
  S9_RETURN_IF_ERROR(CheckRank(op, "a", d, 4, kNhwc));
  S9_RETURN_IF_ERROR(CheckShape(op, "b", b.dimensions(), "a", d));
  S9_RETURN_IF_ERROR(CheckRank(op, "shift", shift.dimensions(), 1, "(C,)"));
  S9_RETURN_IF_ERROR(CheckSame(op, "shift size", shift.dimensions()[0], "a channels", d[3]));
  auto od = out->dimensions();
  if (od.size() != 2 || od[0] != 2 || od[1] != d[3]) {
    return Invalid(op, "the result must have shape (2, C) = (2, ", d[3], "), got ",
                   ShapeString(od));
  }
  const int64_t rows = d[0] * d[1], w = d[2], c = d[3];
  const float* as = a.typed_data();
  const float* bs = b.typed_data();
  const float* shifts = shift.typed_data();
  const int64_t chunks = NumChunks(pool, rows);
  const CallBuffer<double, kPartialSlot> partial_buffer(chunks * 2 * c, true);
  double* partial = partial_buffer.get();
  ParallelFor(pool, rows, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    AddRowSums(end - begin, w, c, as + begin * w * c, bs + begin * w * c, shifts,
               partial + chunk * 2 * c);
  });
  ReducePartials(partial, chunks, 2 * c, out->typed_data());
  return ffi::Error::Success();
}

// y[n, i, j, :] = x[n] sampled at (rows[n, i, j], cols[n, i, j]) with bilinear weights,
// the corners outside the image counting as 0: jax.scipy.ndimage.map_coordinates(order=1,
// mode="constant", cval=0) of each image and channel, in its order of operations (the
// corners' weight products, summed row-major). The device augmentation's warp
// (input_pipeline.device_augment), which XLA:CPU computes as four gathers a channel:
// ~5 ms for 128 CIFAR images, ~5x this pass.
ffi::Error BilinearSample(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> rows, ffi::Buffer<ffi::F32> cols,
                          ffi::ResultBuffer<ffi::F32> y) {
  constexpr char op[] = "s9_bilinear_sample";
  auto xd = x.dimensions(), rd = rows.dimensions(), yd = y->dimensions();
  S9_RETURN_IF_ERROR(CheckRank(op, "x", xd, 4, kNhwc));
  S9_RETURN_IF_ERROR(CheckRank(op, "rows", rd, 3, "(N, H, W)"));
  S9_RETURN_IF_ERROR(CheckShape(op, "cols", cols.dimensions(), "rows", rd));
  S9_RETURN_IF_ERROR(CheckSame(op, "rows batch", rd[0], "x batch", xd[0]));
  S9_RETURN_IF_ERROR(CheckRank(op, "y", yd, 4, kNhwc));
  if (yd[0] != rd[0] || yd[1] != rd[1] || yd[2] != rd[2] || yd[3] != xd[3]) {
    return Invalid(op, "y must have shape (", rd[0], ", ", rd[1], ", ", rd[2], ", ", xd[3],
                   "), got ", ShapeString(yd));
  }
  const int64_t n = xd[0], h = xd[1], w = xd[2], c = xd[3], pixels = rd[1] * rd[2];
  const float* xs = x.typed_data();
  const float* rs = rows.typed_data();
  const float* qs = cols.typed_data();
  float* ys = y->typed_data();
  ParallelFor(pool, n, NumChunks(pool, n), [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t image = begin; image < end; ++image) {
      const float* __restrict in = xs + image * h * w * c;
      for (int64_t p = image * pixels; p < (image + 1) * pixels; ++p) {
        const float r = rs[p], q = qs[p];
        const float r_floor = std::floor(r), q_floor = std::floor(q);
        const float r_up = r - r_floor, q_up = q - q_floor;
        const float r_weight[2] = {1 - r_up, r_up}, q_weight[2] = {1 - q_up, q_up};
        // Each corner's weight and offset; a corner outside the image (or at a NaN or
        // far-off coordinate, checked before any float-to-int conversion) reads pixel 0
        // with weight 0, so the channel loop below has no branches.
        float weight[4];
        int64_t at[4];
        for (int a = 0; a < 2; ++a) {
          for (int b = 0; b < 2; ++b) {
            const bool inside = r_floor + a >= 0 && r_floor + a < h && q_floor + b >= 0 &&
                                q_floor + b < w;
            weight[2 * a + b] = inside ? r_weight[a] * q_weight[b] : 0.0f;
            at[2 * a + b] = inside ? ((static_cast<int64_t>(r_floor) + a) * w +
                                      static_cast<int64_t>(q_floor) + b) * c : 0;
          }
        }
        float* __restrict out = ys + p * c;
        for (int64_t k = 0; k < c; ++k) {
          out[k] = weight[0] * in[at[0] + k] + weight[1] * in[at[1] + k] +
                   weight[2] * in[at[2] + k] + weight[3] * in[at[3] + k];
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// Strides, dilations, low padding and high padding, each (height, width).
#define S9_CONV_ATTRS                                                                 \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("dh").Attr<int64_t>("dw") \
      .Attr<int64_t>("ph").Attr<int64_t>("pw").Attr<int64_t>("ph_hi")                \
      .Attr<int64_t>("pw_hi")

XLA_FFI_DEFINE_HANDLER_SYMBOL(S9DepthwiseForward, DepthwiseForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel (kh, kw, c)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  S9_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(S9DepthwiseBackward, DepthwiseBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dkernel
                                  S9_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(S9ChannelSums, ChannelSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift (c,)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // (2, c)

XLA_FFI_DEFINE_HANDLER_SYMBOL(S9DenseForward, DenseForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel (kh, kw, cin, cout)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  S9_CONV_ATTRS.Attr<int64_t>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(S9DenseInputGrad, DenseInputGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  S9_CONV_ATTRS.Attr<int64_t>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(S9DenseKernelGrad, DenseKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dkernel
                                  S9_CONV_ATTRS.Attr<int64_t>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(S9SeparableForward, SeparableForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // prologue (3 or 0, c)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // depthwise (kh, kw, c)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // pointwise (c, f)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sums (2 or 0, f)
                                  S9_CONV_ATTRS.Attr<int64_t>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(S9SeparableBackward, SeparableBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // prologue
                                  .Arg<ffi::Buffer<ffi::F32>>()  // depthwise
                                  .Arg<ffi::Buffer<ffi::F32>>()  // pointwise
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dprologue (2 or 0, c)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ddepthwise
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dpointwise
                                  S9_CONV_ATTRS.Attr<int64_t>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(S9BilinearSample, BilinearSample,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (n, h, w, c)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rows (n, ho, wo)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cols (n, ho, wo)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y (n, ho, wo, c)

// 1 if the bfloat16 products (the separable ops' 1x1s, the dense convs) run on AMX tiles
// in this process (the library targets them and Linux granted them), else 0: native.py
// asks, for `model.pointwise_bf16` and `model.dense_bf16` = 'auto'.
extern "C" int S9Bf16OnAmx() {
#if S9_AMX
  return AmxUsable() ? 1 : 0;
#else
  return 0;
#endif
}
