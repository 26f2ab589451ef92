// Few-row matmuls for the decode loop on x86 CPUs with AVX-512 BF16 (Zen 4, Sapphire Rapids and
// later): straight from 4-bit (NF4/FP4) or int8 codes, and from bf16 weights laid out [out, in].
//
// Why this exists: XLA's CPU backend cannot fuse a dequantization into its dot, so a decode step
// over a quantized model wrote every layer's weight out in bf16 and read it back (and the NF4
// level lookup ran as a gather), and its dot runs products of a few rows through paths with a
// high fixed cost. Here each weight is decoded in registers (a 16-entry permute per nibble, or a
// widening convert), scaled and rounded to bf16 exactly as XLA's path rounds it, and multiplied
// with VDPBF16PS (float32 sums): a step reads the codes and nothing else.
//
// The handlers are XLA FFI custom calls (registered by ptjax/kernels/cpu.py); the work is split
// over output features between XLA's intra-op thread pool and the calling thread.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kChunk = 32;    // weights per bf16 vector (VDPBF16PS pairs 16 x 2)
constexpr int kTile = 16;     // weight rows per tile in `TileRows`
// From this many rows of x on, quantized weights are decoded a tile at a time into a scratch all
// rows read (`DecodedTiles`); below it, each weight is multiplied as it is decoded
// (`DirectRows`): for NF4 at 1 row that is 16% faster, at 16 rows 6% slower (in-process A/B of a
// llama-56m decode on a 2-core Zen 4).
constexpr int64_t kTileFromRows = 8;

// The rows of x [m, k] bf16, reordered inside every 32-column chunk as evens then odds: the order
// in which `Nf4Rows` emits a chunk's weights (VDPBF16PS multiplies element i by element i).
std::vector<uint16_t> EvensThenOdds(const uint16_t* x, int64_t m, int64_t k) {
  std::vector<uint16_t> out(m * k);
  for (int64_t r = 0; r < m; ++r) {
    const uint16_t* src = x + r * k;
    uint16_t* dst = out.data() + r * k;
    for (int64_t c = 0; c < k; c += kChunk) {
      for (int i = 0; i < kChunk / 2; ++i) {
        dst[c + i] = src[c + 2 * i];
        dst[c + kChunk / 2 + i] = src[c + 2 * i + 1];
      }
    }
  }
  return out;
}

// Weight rows of a 4-bit matrix as bitsandbytes stores PyTorch's [out, in]: row n, columns
// [c, c + 32) from 16 bytes of codes (first weight in each high nibble) times the block's
// absmax, rounded to bf16; the high nibbles' weights first, then the low nibbles'.
struct Nf4Rows {
  const uint8_t* codes;
  const float* absmax;
  __m512 levels;
  int64_t k, block;

  __m512bh operator()(int64_t n, int64_t c) const {
    const __m512 scale = _mm512_set1_ps(absmax[(n * k + c) / block]);
    const __m512i bytes = _mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + (n * k + c) / 2)));
    const __m512 high =
        _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), levels), scale);
    // VPERMPS reads only the low 4 bits of each index: the low nibble needs no mask.
    const __m512 low = _mm512_mul_ps(_mm512_permutexvar_ps(bytes, levels), scale);
    return _mm512_cvtne2ps_pbh(low, high);
  }
};

// Weight rows of an int8 matrix stored [out, in] with one scale per row: `code * scale`
// rounded to bf16, in column order.
struct Int8Rows {
  const int8_t* codes;
  const float* scale;
  int64_t k;

  __m512bh operator()(int64_t n, int64_t c) const {
    const __m512 s = _mm512_set1_ps(scale[n]);
    const int8_t* p = codes + n * k + c;
    const __m512 first = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    const __m512 second = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
    return _mm512_cvtne2ps_pbh(_mm512_mul_ps(second, s), _mm512_mul_ps(first, s));
  }
};

// out[r, n] for n in [n0, n1), r < M: each weight vector multiplied by every row of x as soon as
// it is decoded (one accumulator per row, summed across lanes at the end of each weight row).
template <int M, typename Decoder>
void DirectRows(const uint16_t* x, int64_t k, const Decoder& decode, float* out,
                int64_t out_stride, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[M];
    for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < k; c += kChunk) {
      const __m512bh w = decode(n, c);
      for (int r = 0; r < M; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], w, (__m512bh)_mm512_loadu_si512(x + r * k + c));
    }
    for (int r = 0; r < M; ++r) out[r * out_stride + n] = _mm512_reduce_add_ps(acc[r]);
  }
}

// One vector whose lane j is the sum of v[j]'s 16 lanes (a transpose folded into the adds:
// about 3 instructions per sum instead of a full horizontal reduction each).
inline __m512 SumEach16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 s0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 s1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s0, s1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(s0, s1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// out[r, n0 + j] = sum_c x[r, c] w[j][c] for j < width, r < m: a tile of up to 16 weight rows
// (bf16, k values each, k a multiple of 32) against every row of x (bf16 [m, k]). Rows of x go
// in pairs against 8 weight rows at a time (16 accumulators, and each weight vector loaded is
// used twice: the loads, not the multiplies, are what limits this loop); an odd last row of x
// goes alone against all 16. The tile stays in cache between rows.
inline void TileRows(const uint16_t* x, int64_t m, int64_t k, const uint16_t* const* w,
                     int width, float* out, int64_t out_stride, int64_t n0) {
  const uint32_t valid = (1u << width) - 1;
  int64_t r = 0;
  for (; r + 1 < m; r += 2) {
    const uint16_t* x0 = x + r * k;
    const uint16_t* x1 = x0 + k;
    for (int h = 0; h < kTile; h += 8) {
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t c = 0; c < k; c += kChunk) {
        const __m512bh a = (__m512bh)_mm512_loadu_si512(x0 + c);
        const __m512bh b = (__m512bh)_mm512_loadu_si512(x1 + c);
        for (int j = 0; j < 8; ++j) {
          const __m512bh wv = (__m512bh)_mm512_loadu_si512(w[h + j] + c);
          acc[j] = _mm512_dpbf16_ps(acc[j], wv, a);
          acc[8 + j] = _mm512_dpbf16_ps(acc[8 + j], wv, b);
        }
      }
      // Lanes 0-7: row r against weights h..h+7; lanes 8-15: row r + 1.
      const __m512 sums = SumEach16(acc);
      const uint32_t cols = (valid >> h) & 0xFF;
      _mm512_mask_storeu_ps(out + r * out_stride + n0 + h, static_cast<__mmask16>(cols), sums);
      _mm512_mask_storeu_ps(out + (r + 1) * out_stride + n0 + h - 8,
                            static_cast<__mmask16>(cols << 8), sums);
    }
  }
  for (; r < m; ++r) {
    __m512 acc[kTile];
    for (int j = 0; j < kTile; ++j) acc[j] = _mm512_setzero_ps();
    const uint16_t* xr = x + r * k;
    for (int64_t c = 0; c < k; c += kChunk) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xr + c);
      for (int j = 0; j < kTile; ++j)
        acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(w[j] + c), xv);
    }
    _mm512_mask_storeu_ps(out + r * out_stride + n0, static_cast<__mmask16>(valid),
                          SumEach16(acc));
  }
}

// x [m, k] bf16 times a bf16 weight stored [n, k] (a decode-layout kernel): tiles of 16 rows.
void Bf16Tiles(const uint16_t* x, int64_t m, int64_t k, const uint16_t* w, float* out,
               int64_t n, int64_t n0, int64_t n1) {
  for (int64_t t = n0; t < n1; t += kTile) {
    const int width = static_cast<int>(std::min<int64_t>(kTile, n - t));
    const uint16_t* rows[kTile];
    for (int j = 0; j < kTile; ++j) rows[j] = w + (t + std::min(j, width - 1)) * k;
    TileRows(x, m, k, rows, width, out, n, t);
  }
}

// The same for quantized weights: each tile is decoded once into a bf16 scratch, then
// multiplied by every row of x as above.
template <typename Decoder>
void DecodedTiles(const uint16_t* x, int64_t m, int64_t k, const Decoder& decode, float* out,
                  int64_t n, int64_t n0, int64_t n1) {
  std::vector<uint16_t> scratch(kTile * k);
  for (int64_t t = n0; t < n1; t += kTile) {
    const int width = static_cast<int>(std::min<int64_t>(kTile, n - t));
    const uint16_t* rows[kTile];
    for (int j = 0; j < width; ++j) {
      uint16_t* dst = scratch.data() + j * k;
      for (int64_t c = 0; c < k; c += kChunk)
        _mm512_storeu_si512(dst + c, (__m512i)decode(t + j, c));
      rows[j] = dst;
    }
    for (int j = width; j < kTile; ++j) rows[j] = rows[width - 1];
    TileRows(x, m, k, rows, width, out, n, t);
  }
}

// Runs fn(n0, n1) over [0, n) in pieces (multiples of `align` items of `cost` multiply-adds
// each, at least kMinPiece per piece: below that, handing work to another thread costs more than
// it saves), on the caller and on XLA's pool. Pieces are claimed from a shared counter, so the
// caller finishes the work alone if the pool is busy (no deadlock when every pool thread is
// itself waiting in such a call).
constexpr int64_t kMinPiece = 1 << 18;

template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t align, int64_t cost, F fn) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), 8);
  const int64_t min_items = (kMinPiece + cost - 1) / std::max<int64_t>(cost, 1);
  int64_t grain = std::max(n / ((helpers + 1) * 4), min_items);
  grain = std::max<int64_t>(align, (grain + align - 1) / align * align);
  const int64_t pieces = (n + grain - 1) / grain;
  if (helpers == 0 || pieces <= 1) {
    fn(0, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, pieces, grain, n, fn]() {
    for (int64_t p; (p = state->next.fetch_add(1)) < pieces;) {
      fn(p * grain, std::min(n, (p + 1) * grain));
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t h = 0; h < std::min(helpers, pieces - 1); ++h) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (state->done.load(std::memory_order_acquire) < pieces) std::this_thread::yield();
}

// CALL(M) with the compile-time row count M = rows, 1 <= rows < kTileFromRows.
#define PTJAX_DISPATCH_ROWS(rows, CALL)                                          \
  switch (rows) {                                                                \
    case 1: CALL(1); break;                                                      \
    case 2: CALL(2); break;                                                      \
    case 3: CALL(3); break;                                                      \
    case 4: CALL(4); break;                                                      \
    case 5: CALL(5); break;                                                      \
    case 6: CALL(6); break;                                                      \
    default: CALL(7); break;                                                     \
  }
static_assert(kTileFromRows == 8, "PTJAX_DISPATCH_ROWS covers 1..7 rows");

// out [m, n] = x [m, k] times the weight rows `decode` produces, on the caller and XLA's pool.
template <typename Decoder>
void QuantizedMatmul(ffi::ThreadPool& pool, const uint16_t* x, int64_t m, int64_t k, int64_t n,
                     const Decoder& decode, float* out) {
  if (m >= kTileFromRows) {
    ParallelFor(pool, n, kTile, m * k, [=](int64_t n0, int64_t n1) {
      DecodedTiles(x, m, k, decode, out, n, n0, n1);
    });
    return;
  }
  const int rows = static_cast<int>(m);
  ParallelFor(pool, n, 1, m * k, [=](int64_t n0, int64_t n1) {
#define PTJAX_CALL(M) DirectRows<M>(x, k, decode, out, n, n0, n1)
    PTJAX_DISPATCH_ROWS(rows, PTJAX_CALL)
#undef PTJAX_CALL
  });
}

ffi::Error Nf4MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                         ffi::Buffer<ffi::U8> codes, ffi::Buffer<ffi::F32> absmax,
                         ffi::Buffer<ffi::F32> levels, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  const auto od = out->dimensions();
  if (xd.size() != 2 || od.size() != 2 || levels.element_count() != 16)
    return ffi::Error::InvalidArgument("nf4_matmul: x [m, k], out [m, n], 16 levels");
  const int64_t m = xd[0], k = xd[1], n = od[1];
  const int64_t n_codes = static_cast<int64_t>(codes.element_count());
  const int64_t n_blocks = static_cast<int64_t>(absmax.element_count());
  if (od[0] != m || n_codes * 2 != n * k || n_blocks == 0 || (n * k) % n_blocks != 0)
    return ffi::Error::InvalidArgument("nf4_matmul: shapes do not fit [out, in] 4-bit blocks");
  const int64_t block = n * k / n_blocks;
  if (block % kChunk != 0 || k % block != 0)
    return ffi::Error::InvalidArgument(
        "nf4_matmul: the block size must divide `in` and be a multiple of 32");
  const std::vector<uint16_t> xp = EvensThenOdds(x.typed_data(), m, k);
  const Nf4Rows decode{codes.typed_data(), absmax.typed_data(),
                       _mm512_loadu_ps(levels.typed_data()), k, block};
  QuantizedMatmul(pool, xp.data(), m, k, n, decode, out->typed_data());
  return ffi::Error::Success();
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                          ffi::Buffer<ffi::S8> codes_t, ffi::Buffer<ffi::F32> scale,
                          ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  const auto cd = codes_t.dimensions();
  if (xd.size() != 2 || cd.size() != 2 || cd[1] != xd[1] || xd[1] % kChunk != 0 ||
      static_cast<int64_t>(scale.element_count()) != cd[0])
    return ffi::Error::InvalidArgument(
        "int8_matmul: x [m, k], codes [n, k], scale [n], k a multiple of 32");
  const int64_t m = xd[0], k = xd[1], n = cd[0];
  const Int8Rows decode{codes_t.typed_data(), scale.typed_data(), k};
  QuantizedMatmul(pool, x.typed_data(), m, k, n, decode, out->typed_data());
  return ffi::Error::Success();
}

ffi::Error Bf16MatmulNtImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                            ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || wd[1] != xd[1] || xd[1] % kChunk != 0)
    return ffi::Error::InvalidArgument("bf16_matmul_nt: x [m, k], w [n, k], k a multiple of 32");
  const int64_t m = xd[0], k = xd[1], n = wd[0];
  const uint16_t* xv = x.typed_data();
  const uint16_t* wv = w.typed_data();
  float* o = out->typed_data();
  ParallelFor(pool, n, kTile, m * k,
              [=](int64_t n0, int64_t n1) { Bf16Tiles(xv, m, k, wv, o, n, n0, n1); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PtjaxNf4Matmul, Nf4MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PtjaxInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PtjaxBf16MatmulNt, Bf16MatmulNtImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
