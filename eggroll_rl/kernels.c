/* EGGROLL's compiled CPU kernels (built and loaded by eggroll_rl/kernels.py).

   eggroll_lowrank_rows: the per-member low-rank term of one nn.Linear, for the layer-wise
   population forward (the shared GEMM is added by PyTorch).
   eggroll_mlp_forward: a whole MLP policy (observation normaliser, Linear + activation layers)
   for every member in one call, shared GEMM included, with an optional argmax epilogue.
   eggroll_tanh: the activation's tanh, exported for its accuracy test. */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <math.h>
#define MAX_RANK 64
#if defined(__SSE2__)
#include <immintrin.h>
#endif

/* IEEE half -> float, for tails: one instruction with F16C, bit manipulation without. */
#if defined(__F16C__)
static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0 && man == 0) {
    bits = sign;
  } else if (exp == 0) {  /* subnormal: renormalise */
    exp = 1;
    while (!(man & 0x400u)) { man <<= 1; --exp; }
    bits = sign | ((exp + 112u) << 23) | ((man & 0x3ffu) << 13);
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}
#endif

/* AVX2 + F16C: 8 lanes. (16-lane AVX-512 was measured no faster here.) */
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define W 8
typedef __m256 vec;
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vec hload(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline vec vset(float v) { return _mm256_set1_ps(v); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
static inline float vsum(vec v) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  q = _mm_hadd_ps(q, q);
  return _mm_cvtss_f32(_mm_hadd_ps(q, q));
}
#endif

/* x . b over n numbers, b float16. */
static inline float dot_half(const float* restrict x, const uint16_t* restrict b, int64_t n) {
  int64_t j = 0;
  float s = 0.f;
#ifdef W
  if (n >= W) { /* narrow inputs (a 4-wide observation) skip the vector sums entirely */
    /* Two accumulators so consecutive FMAs do not wait on each other. */
    vec s0 = vset(0.f), s1 = vset(0.f);
    for (; j + 2 * W <= n; j += 2 * W) {
      s0 = vfma(vload(x + j), hload(b + j), s0);
      s1 = vfma(vload(x + j + W), hload(b + j + W), s1);
    }
    for (; j + W <= n; j += W) s0 = vfma(vload(x + j), hload(b + j), s0);
    s = vsum(s0) + vsum(s1);
  }
#endif
  for (; j < n; ++j) s += x[j] * half_to_float(b[j]);
  return s;
}

/* y = bias + ce e + sum_q (ca (x . b_q)) a_q for one row. The factors are stored factor-major:
   b_q = b + q n and a_q = a + q m are contiguous; a, b, e are float16 table numbers. */
static inline __attribute__((always_inline)) void member_row(
    const float* restrict x, const uint16_t* restrict a, const uint16_t* restrict b,
    const uint16_t* restrict e, float ce, float ca, const float* restrict bias, float* restrict y,
    int64_t n, int64_t m, int64_t r) {
  float s[MAX_RANK];
  for (int64_t q = 0; q < r; ++q) s[q] = ca * dot_half(x, b + q * n, n);
  int64_t j = 0;
#ifdef W
  const vec cv = vset(ce), zero = vset(0.f);
  for (; j + W <= m; j += W) {
    vec v = bias ? vload(bias + j) : zero;
    if (e) v = vfma(cv, hload(e + j), v);
    for (int64_t q = 0; q < r; ++q) v = vfma(vset(s[q]), hload(a + q * m + j), v);
    vstore(y + j, v);
  }
#endif
  for (; j < m; ++j) {
    float v = bias ? bias[j] : 0.f;
    if (e) v += ce * half_to_float(e[j]);
    for (int64_t q = 0; q < r; ++q) v += s[q] * half_to_float(a[q * m + j]);
    y[j] = v;
  }
}

/* Rows g*k .. g*k+k-1 belong to member i = map[g] (map NULL: i = g), whose A (r x m), B (r x n)
   and e (m) start at off[i] + pa, + pb, + pe (pe < 0: no e). Groups are split into contiguous
   blocks per thread, the same rows each thread's share of the following GEMM is likely to touch. */
void eggroll_lowrank_rows(const float* restrict x, const uint16_t* restrict table,
                          const int64_t* restrict off, const float* restrict ca,
                          const float* restrict ce, const float* restrict bias,
                          float* restrict y, int64_t groups, const int64_t* restrict map,
                          int64_t k, int64_t n, int64_t m, int64_t r, int64_t pa, int64_t pb,
                          int64_t pe, int nthreads) {
  #pragma omp parallel for schedule(static) num_threads(nthreads) \
      if (nthreads > 1 && groups * k * r * (n + m) > 32768)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t i = map ? map[g] : g;
    const uint16_t* w = table + off[i];
#ifdef W
    if (g + 2 < groups) {  /* the table windows are random: start the next fetches early */
      const uint16_t* nw = table + off[map ? map[g + 2] : g + 2];
      for (int64_t j = 0; j < n * r; j += 32) _mm_prefetch((const char*)(nw + pb + j), _MM_HINT_T0);
      for (int64_t j = 0; j < m * r; j += 32) _mm_prefetch((const char*)(nw + pa + j), _MM_HINT_T0);
      if (pe >= 0)
        for (int64_t j = 0; j < m; j += 32) _mm_prefetch((const char*)(nw + pe + j), _MM_HINT_T0);
    }
#endif
    const uint16_t* e = pe >= 0 ? w + pe : NULL;
    const float cei = pe >= 0 ? ce[i] : 0.f;
    for (int64_t row = g * k; row < (g + 1) * k; ++row) {
      /* A literal rank 1 lets the compiler drop the factor loops on the common path. */
      if (r == 1)
        member_row(x + row * n, w + pa, w + pb, e, cei, ca[i], bias, y + row * m, n, m, 1);
      else
        member_row(x + row * n, w + pa, w + pb, e, cei, ca[i], bias, y + row * m, n, m, r);
    }
  }
}

/* ---- The fused MLP forward ------------------------------------------------------------------

   Rows are processed in tiles of TILE rows that stay in L1 through every layer. For each layer the
   tile's output rows are first set to bias + c_e e_i + c_a (h B_i) A_i^T (member_row), then the
   shared h W^T is accumulated into them by a register-blocked micro-kernel over W^T (n, m_pad),
   m_pad a multiple of the vector width (padded columns of W^T are zero). Vectors are GCC vector
   extensions: AVX-512, AVX2 or SSE registers, whatever -march gives. */

#if defined(__AVX512F__)
#define VW 16
#define ACC 16 /* accumulator registers the micro-kernel keeps (of 32) */
#elif defined(__AVX__)
#define VW 8
#define ACC 8 /* of 16 */
#else
#define VW 4
#define ACC 8
#endif
#define TILE 16
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

static inline vf vf_load(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vf_store(float* p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf vf_splat(float s) {
#if VW == 16
  return (vf)_mm512_set1_ps(s);
#elif VW == 8
  return (vf)_mm256_set1_ps(s);
#else
  return s - (vf){0}; /* s - 0 is s for every float, -0 included, so this folds to a broadcast */
#endif
}
static inline vf vf_select(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

static inline vf vf_min(vf a, vf b) {
#if VW == 16
  return (vf)_mm512_min_ps((__m512)a, (__m512)b);
#elif VW == 8
  return (vf)_mm256_min_ps((__m256)a, (__m256)b);
#elif defined(__SSE2__)
  return (vf)_mm_min_ps((__m128)a, (__m128)b);
#else
  return vf_select(a < b, a, b);
#endif
}

/* tanh within 2e-7 relative (TANH_MAX_REL_ERROR in kernels.py; the test sweeps every float32).
   Below |x| = 0.55 an odd polynomial (tanh(x)/x in x^2, degree 6); above it
   1 - 2 / (exp(2|x|) + 1) with exp(y) = 2^k e^f, k = round(y / ln2) by the 1.5 * 2^23 trick,
   |f| <= ln2 / 2, e^f of degree 6 (relative error 2e-9), and an IEEE division (the hardware
   reciprocal estimate plus one Newton step was 2.9e-7 off at x = 0.5572: the subtraction from 1
   doubles its error there). Coefficients: least squares in float64 on Chebyshev nodes (relative
   errors 3e-11 and 2e-9 before float32 rounding). */
static inline vf vf_tanh(vf x) {
  const vi sign_bit = (vi){0} + (int32_t)0x80000000;
  const vf magic = vf_splat(12582912.f);
  vf a = (vf)((vi)x & ~sign_bit);
  vf t = a * a;
  vf p = vf_splat(0.0024048423752563706f);
  p = p * t + -0.008422206553940695f;
  p = p * t + 0.02178565197295086f;
  p = p * t + -0.05396009446682173f;
  p = p * t + 0.13333296796663646f;
  p = p * t + -0.33333332794309956f;
  vf small = a + a * (t * p);
  vf y = vf_min(a + a, vf_splat(20.f)); /* tanh(10) rounds to 1 */
  vf kf = y * 1.4426950408889634f + magic;
  vf k = kf - magic;
  vf f = y - k * 0.693145751953125f - k * 1.4286068203094172e-06f;
  vf e = vf_splat(0.0013829420595877328f);
  e = e * f + 0.008374771520121845f;
  e = e * f + 0.04166835803302428f;
  e = e * f + 0.16666420832119083f;
  e = e * f + 0.4999999149303676f;
  e = e * f + 1.0000000361258992f;
  e = e * f + 1.0000000005920207f;
  e = e * (vf)(((vi)kf << 23) + (127 << 23)); /* kf's low mantissa bits hold k */
  vf big = 1.f - 2.f / (e + 1.f);
  vf r = vf_select(a >= 0.55f, big, small); /* NaN fails the test and stays NaN via `small` */
  return (vf)((vi)r | ((vi)x & sign_bit));
}

void eggroll_tanh(const float* x, float* y, int64_t n) {
  int64_t j = 0;
  for (; j + VW <= n; j += VW) vf_store(y + j, vf_tanh(vf_load(x + j)));
  if (j < n) {
    float in[VW] = {0}, res[VW];
    memcpy(in, x + j, (size_t)(n - j) * sizeof(float));
    vf_store(res, vf_tanh(vf_load(in)));
    memcpy(y + j, res, (size_t)(n - j) * sizeof(float));
  }
}

/* For the accuracy test: the largest relative error of vf_tanh over every float32 whose bits lie
   in [lo, hi) (positive x; vf_tanh is odd by construction, it copies the sign bit), against tanh
   in double (a Taylor series below 2^-6, where its first omitted term is under 2^-66 relative).
   The worst x goes to *worst; x = 0 is skipped (its result, 0, has no relative error). */
double eggroll_tanh_sweep(uint32_t lo, uint32_t hi, float* worst, int nthreads) {
  double best = 0.0;
  float best_x = 0.f;
  const int64_t chunk = 4096;
  #pragma omp parallel num_threads(nthreads)
  {
    double local = 0.0;
    float local_x = 0.f;
    float xs[4096], ys[4096];
    #pragma omp for schedule(dynamic, 16)
    for (int64_t c = (int64_t)lo; c < (int64_t)hi; c += chunk) {
      const int64_t n = (int64_t)hi - c < chunk ? (int64_t)hi - c : chunk;
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t bits = (uint32_t)(c + j);
        memcpy(xs + j, &bits, sizeof bits);
      }
      eggroll_tanh(xs, ys, n);
      for (int64_t j = 0; j < n; ++j) {
        const double x = xs[j];
        if (x == 0.0) continue;
        double exact;
        if (x < 0x1p-6) {
          const double t = x * x;
          exact = x * (1.0 + t * (-1.0 / 3 + t * (2.0 / 15 + t * (-17.0 / 315 + t * (62.0 / 2835)))));
        } else {
          exact = tanh(x);
        }
        const double err = fabs((double)ys[j] - exact) / exact;
        if (!(err <= local)) { local = err; local_x = xs[j]; } /* a NaN result counts as worst */
      }
    }
    #pragma omp critical
    if (best == best && (!(local <= best) || (local == best && local_x < best_x))) { best = local; best_x = local_x; }
  }
  *worst = best_x;
  return best;
}

typedef struct {
  const float* wt;   /* W^T, (n, m_pad), zero beyond column m */
  const float* bias; /* (m), or NULL */
  int64_t n, m, m_pad;
  int64_t pa, pb, pe; /* positions of A, B, e in a member's window; < 0: not perturbed */
  int64_t act;        /* 0 identity, 1 tanh, 2 relu */
} eggroll_layer;

typedef struct {
  int64_t nlayers, in_dim, ld; /* ld: row stride of the tile buffers, >= every m_pad and in_dim */
  int64_t rank, window;        /* window: numbers a member reads from the table (prefetched) */
  const eggroll_layer* layers;
  const uint16_t* table;       /* float16 noise table; NULL: every member is the center */
  const int64_t* off;          /* per member: start of its window */
  const float* ca;             /* per member: sign sigma / sqrt(r) */
  const float* ce;             /* per member: sign sigma */
  const float* mean;           /* observation normaliser, or NULL */
  const float* std;
  float clip;
} eggroll_mlp;

/* y[0:rt, c0:c0+v*VW] += h[0:rt, 0:n] @ wt[0:n, c0:...]: rt*v accumulators held in registers. */
static inline __attribute__((always_inline)) void micro(
    const int rt, const int v, const float* restrict h, int64_t ld, const float* restrict wt,
    int64_t ldw, int64_t n, float* restrict y) {
  vf acc[ACC];
#pragma GCC unroll 16
  for (int r = 0; r < rt; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < v; ++q) acc[r * v + q] = vf_load(y + r * ld + q * VW);
  for (int64_t k = 0; k < n; ++k) {
    vf w[4];
#pragma GCC unroll 4
    for (int q = 0; q < v; ++q) w[q] = vf_load(wt + k * ldw + q * VW);
#pragma GCC unroll 16
    for (int r = 0; r < rt; ++r) {
      vf b = vf_splat(h[r * ld + k]);
#pragma GCC unroll 4
      for (int q = 0; q < v; ++q) acc[r * v + q] += b * w[q];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < rt; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < v; ++q) vf_store(y + r * ld + q * VW, acc[r * v + q]);
}

#define MICRO(RT, V) micro(RT, V, h + r * ld, ld, wt + c, m_pad, n, y + r * ld + c)
/* Width v (vectors) takes its widest row block, ACC / v rows, then single rows for the rest. */
#define BLOCKS(V)                                                  \
  do {                                                             \
    for (; r + ACC / (V) <= rows; r += ACC / (V)) MICRO(ACC / (V), V); \
    for (; r < rows; ++r) MICRO(1, V);                             \
  } while (0)
static void gemm_acc(const float* h, int64_t ld, const float* wt, int64_t n, int64_t m_pad,
                     float* y, int rows) {
  for (int64_t c = 0; c < m_pad; c += 4 * VW) {
    const int64_t v = (m_pad - c) / VW;
    int r = 0;
    if (v >= 4) BLOCKS(4);
    else if (v == 3) BLOCKS(3);
    else if (v == 2) BLOCKS(2);
    else BLOCKS(1);
  }
}
#undef BLOCKS
#undef MICRO

static void activate(float* y, int64_t ld, int rows, int64_t m_pad, int64_t act) {
  if (act == 0) return;
  for (int r = 0; r < rows; ++r)
    for (int64_t j = 0; j < m_pad; j += VW) {
      vf v = vf_load(y + r * ld + j);
      if (act == 1) v = vf_tanh(v);
      else v = (vf)(~(vi)(v < 0.f) & (vi)v); /* relu; NaN stays NaN */
      vf_store(y + r * ld + j, v);
    }
}

/* out (rows, m_last) = the MLP of every row, rows g*k .. g*k+k-1 played by member map[g] (map
   NULL: member g; k = rows / groups). x is read with strides (rs, cs). With `actions`, also write each row's first argmax +
   action_start there; `out` may then be NULL. */
void eggroll_mlp_forward(const eggroll_mlp* p, const float* x, int64_t rows, int64_t groups,
                         const int64_t* map, int64_t rs, int64_t cs, float* out, int64_t* actions,
                         int64_t action_start, int nthreads) {
  const int64_t k = rows / groups, ld = p->ld, tiles = (rows + TILE - 1) / TILE;
  const eggroll_layer* last = p->layers + p->nlayers - 1;
  int64_t work = 0;
  for (int64_t l = 0; l < p->nlayers; ++l) work += p->layers[l].n * p->layers[l].m_pad;
  #pragma omp parallel num_threads(nthreads) if (nthreads > 1 && rows * work > 262144)
  {
    float buf[2 * TILE * ld];
    #pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t r0 = tile * TILE;
      const int t = (int)(rows - r0 < TILE ? rows - r0 : TILE);
      float* h = buf;
      float* y = buf + TILE * ld;
      if (p->table && r0 + TILE < rows) { /* the next tile's members' windows are random reads */
        int64_t end = r0 + 2 * TILE < rows ? r0 + 2 * TILE : rows;
        for (int64_t g = (r0 + TILE) / k; g <= (end - 1) / k; ++g)
          for (int64_t j = 0; j < p->window; j += 32)
            __builtin_prefetch(p->table + p->off[map ? map[g] : g] + j);
      }
      for (int r = 0; r < t; ++r) {
        const float* xr = x + (r0 + r) * rs;
        for (int64_t j = 0; j < p->in_dim; ++j) {
          float v = xr[j * cs];
          if (p->mean) {
            v = (v - p->mean[j]) / p->std[j];
            v = v < -p->clip ? -p->clip : (v > p->clip ? p->clip : v); /* NaN stays NaN */
          }
          h[r * ld + j] = v;
        }
      }
      for (int64_t l = 0; l < p->nlayers; ++l) {
        const eggroll_layer* L = p->layers + l;
        for (int r = 0; r < t; ++r) {
          float* yr = y + r * ld;
          const int64_t i = map ? map[(r0 + r) / k] : (r0 + r) / k;
          if (p->table && (L->pa >= 0 || L->pe >= 0)) {
            const uint16_t* w = p->table + p->off[i];
            const uint16_t* a = w + (L->pa >= 0 ? L->pa : 0);
            const uint16_t* b = w + (L->pb >= 0 ? L->pb : 0);
            const uint16_t* e = L->pe >= 0 ? w + L->pe : NULL;
            /* Literal ranks 0 and 1 let the compiler drop the factor loops on the common paths. */
            if (L->pa < 0)
              member_row(h + r * ld, a, b, e, p->ce[i], p->ca[i], L->bias, yr, L->n, L->m, 0);
            else if (p->rank == 1)
              member_row(h + r * ld, a, b, e, p->ce[i], p->ca[i], L->bias, yr, L->n, L->m, 1);
            else
              member_row(h + r * ld, a, b, e, p->ce[i], p->ca[i], L->bias, yr, L->n, L->m, p->rank);
          } else if (L->bias) {
            memcpy(yr, L->bias, (size_t)L->m * sizeof(float));
          } else {
            memset(yr, 0, (size_t)L->m * sizeof(float));
          }
          memset(yr + L->m, 0, (size_t)(L->m_pad - L->m) * sizeof(float));
        }
        gemm_acc(h, ld, L->wt, L->n, L->m_pad, y, t);
        activate(y, ld, t, L->m_pad, L->act);
        float* swap = h; h = y; y = swap;
      }
      for (int r = 0; r < t; ++r) {
        const float* hr = h + r * ld;
        if (out) memcpy(out + (r0 + r) * last->m, hr, (size_t)last->m * sizeof(float));
        if (actions) {
          /* torch.argmax's order: the first NaN, else the first maximum. !(v <= b) holds for a
             larger v and for a NaN v; a NaN best ends the scan. */
          int64_t best = 0;
          float bv = hr[0];
          for (int64_t j = 1; j < last->m && bv == bv; ++j)
            if (!(hr[j] <= bv)) { best = j; bv = hr[j]; }
          actions[r0 + r] = best + action_start;
        }
      }
    }
  }
}

/* ---- Counter-based Gaussian noise (the definition, in PyTorch ops, is eggroll_rl/noise.py) ----

   eggroll_noise_fill: numbers start..stop-1 of parameter block `block`, draws draw0.., generation
   `gen`, as float16 bits into half[d * ld + k - start] (and their float32 values into full, when
   given). Number 32g + 8l + i is word l of Philox4x32-10 (Salmon et al. 2011) at counter
   (8g + i, draw, gen, block) under the key (seed low, seed high word); the word becomes a normal
   through the inverse-CDF knots (int32, |z| 2^24) with integer interpolation and one
   round-to-nearest-even to float16. Integer operations only (the int -> float conversions below
   are exact), so every build gives the same bits as the reference. Written so the compiler
   vectorises the loops. */
#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u
#define NOISE_BATCH 64 /* counters per batch: 256 numbers, a multiple of 8 */

/* floor(log2 x) for 1 <= x < 2^32, from an exact int -> float conversion (x or x >> 8 < 2^24):
   vectorisable where a count-leading-zeros is not (before AVX-512). */
static inline int32_t noise_msb(uint32_t x) {
  const uint32_t sh = (uint32_t)(x >= (1u << 24)) << 3;
  const float f = (float)(int32_t)(x >> sh);
  uint32_t b;
  memcpy(&b, &f, sizeof b);
  return (int32_t)(b >> 23) - 127 + (int32_t)sh;
}

#if !defined(__AVX2__)
/* Portable: plain loops over a batch of counters (the compiler vectorises the Philox rounds). */
void eggroll_noise_fill(uint16_t* restrict half, float* restrict full, int64_t ld, int64_t draw0,
                        int64_t draws, uint64_t seed, uint32_t gen, uint32_t block, int64_t start,
                        int64_t stop, const int32_t* restrict knots, int nthreads) {
  const int64_t c_first = (start / 32) * 8, c_end = ((stop + 31) / 32) * 8;
  const uint32_t key0 = (uint32_t)seed, key1 = (uint32_t)(seed >> 32);
  #pragma omp parallel for schedule(static) num_threads(nthreads) \
      if (nthreads > 1 && draws * (stop - start) > 65536)
  for (int64_t d = 0; d < draws; ++d) {
    uint32_t x[4][NOISE_BATCH];
    uint16_t h[4 * NOISE_BATCH];
    for (int64_t c = c_first; c < c_end; c += NOISE_BATCH) {
      for (int i = 0; i < NOISE_BATCH; ++i) {
        x[0][i] = (uint32_t)(c + i);
        x[1][i] = (uint32_t)(draw0 + d);
        x[2][i] = gen;
        x[3][i] = block;
      }
      uint32_t k0 = key0, k1 = key1;
      for (int r = 0; r < 10; ++r) {
        for (int i = 0; i < NOISE_BATCH; ++i) {
          const uint64_t p0 = (uint64_t)PHILOX_M0 * x[0][i], p1 = (uint64_t)PHILOX_M1 * x[2][i];
          const uint32_t y0 = (uint32_t)(p1 >> 32) ^ x[1][i] ^ k0;
          const uint32_t y2 = (uint32_t)(p0 >> 32) ^ x[3][i] ^ k1;
          x[1][i] = (uint32_t)p1;
          x[3][i] = (uint32_t)p0;
          x[0][i] = y0;
          x[2][i] = y2;
        }
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
      }
      for (int l = 0; l < 4; ++l) {
        for (int i = 0; i < NOISE_BATCH; ++i) {
          const uint32_t w = x[l][i];
          const uint32_t t = (w << 1) | 1u; /* p = t / 2^33 */
          const int32_t e = noise_msb(t);
          const uint32_t n = t << (31 - e);
          const int32_t q = e * 256 + (int32_t)((n >> 23) & 255u);
          const uint32_t hi = (uint32_t)knots[q], lo = (uint32_t)knots[q + 1];
          const uint32_t v = lo + (((4096u - ((n >> 11) & 4095u)) * (hi - lo)) >> 12);
          const int32_t b = noise_msb(v);
          const int32_t s = (b - 10) & -(int32_t)(b > 10);
          const uint32_t r = (2u * v + (1u << s) - 1u + ((v >> s) & 1u)) >> (s + 1);
          h[32 * (i / 8) + 8 * l + i % 8] = (uint16_t)((((uint32_t)s << 10) + r) | ((w >> 31) << 15));
        }
      }
      const int64_t first = c * 4, last = (c + NOISE_BATCH) * 4; /* numbers of this batch */
      const int64_t lo = first < start ? start : first, hi = last > stop ? stop : last;
      if (lo >= hi) continue;
      memcpy(half + d * ld + (lo - start), h + (lo - first), (size_t)(hi - lo) * sizeof(uint16_t));
      if (full)
        for (int64_t k = lo; k < hi; ++k) full[d * ld + (k - start)] = half_to_float(h[k - first]);
    }
  }
}
#endif

#if defined(__AVX2__)
/* AVX2: 8 counters per register, numbers 32g + 8l + i of a group straight from register l. */
static inline __m256i noise_msb8(__m256i x) { /* noise_msb, 8 lanes */
  const __m256i small = _mm256_cmpeq_epi32(_mm256_srli_epi32(x, 24), _mm256_setzero_si256());
  const __m256i sh = _mm256_andnot_si256(small, _mm256_set1_epi32(8));
  const __m256i f = _mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_srlv_epi32(x, sh)));
  return _mm256_add_epi32(_mm256_sub_epi32(_mm256_srli_epi32(f, 23), _mm256_set1_epi32(127)), sh);
}

static inline __m256i noise_bits8(__m256i w, const int32_t* knots) { /* words -> float16 bits */
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i t = _mm256_or_si256(_mm256_slli_epi32(w, 1), one);
  const __m256i e = noise_msb8(t);
  const __m256i n = _mm256_sllv_epi32(t, _mm256_sub_epi32(_mm256_set1_epi32(31), e));
  const __m256i q = _mm256_add_epi32(_mm256_slli_epi32(e, 8),
                                     _mm256_and_si256(_mm256_srli_epi32(n, 23), _mm256_set1_epi32(255)));
  const __m256i hi = _mm256_i32gather_epi32((const int*)knots, q, 4);
  const __m256i lo = _mm256_i32gather_epi32((const int*)(knots + 1), q, 4);
  const __m256i g = _mm256_sub_epi32(_mm256_set1_epi32(4096),
                                     _mm256_and_si256(_mm256_srli_epi32(n, 11), _mm256_set1_epi32(4095)));
  const __m256i v = _mm256_add_epi32(lo, _mm256_srli_epi32(_mm256_mullo_epi32(g, _mm256_sub_epi32(hi, lo)), 12));
  const __m256i s = _mm256_max_epi32(_mm256_sub_epi32(noise_msb8(v), _mm256_set1_epi32(10)),
                                     _mm256_setzero_si256());
  const __m256i sum = _mm256_add_epi32(
      _mm256_add_epi32(_mm256_slli_epi32(v, 1), _mm256_sub_epi32(_mm256_sllv_epi32(one, s), one)),
      _mm256_and_si256(_mm256_srlv_epi32(v, s), one));
  const __m256i r = _mm256_srlv_epi32(sum, _mm256_add_epi32(s, one));
  return _mm256_or_si256(_mm256_add_epi32(_mm256_slli_epi32(s, 10), r),
                         _mm256_slli_epi32(_mm256_srli_epi32(w, 31), 15));
}

void eggroll_noise_fill(uint16_t* restrict half, float* restrict full, int64_t ld, int64_t draw0,
                        int64_t draws, uint64_t seed, uint32_t gen, uint32_t block, int64_t start,
                        int64_t stop, const int32_t* restrict knots, int nthreads) {
  const int64_t g_first = start / 32, g_end = (stop + 31) / 32;
  const __m256i m0 = _mm256_set1_epi32((int)PHILOX_M0), m1 = _mm256_set1_epi32((int)PHILOX_M1);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  #pragma omp parallel for schedule(static) num_threads(nthreads) \
      if (nthreads > 1 && draws * (stop - start) > 65536)
  for (int64_t d = 0; d < draws; ++d) {
    uint16_t* hrow = half + d * ld - start;
    float* frow = full ? full + d * ld - start : NULL;
    for (int64_t g = g_first; g < g_end; ++g) {
      __m256i x0 = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)(8 * g)), lanes);
      __m256i x1 = _mm256_set1_epi32((int)(uint32_t)(draw0 + d));
      __m256i x2 = _mm256_set1_epi32((int)gen), x3 = _mm256_set1_epi32((int)block);
      uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
      for (int r = 0; r < 10; ++r) {
        const __m256i e0 = _mm256_mul_epu32(x0, m0), o0 = _mm256_mul_epu32(_mm256_srli_epi64(x0, 32), m0);
        const __m256i e1 = _mm256_mul_epu32(x2, m1), o1 = _mm256_mul_epu32(_mm256_srli_epi64(x2, 32), m1);
        const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(e0, 32), o0, 0xAA);
        const __m256i lo0 = _mm256_blend_epi32(e0, _mm256_slli_epi64(o0, 32), 0xAA);
        const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(e1, 32), o1, 0xAA);
        const __m256i lo1 = _mm256_blend_epi32(e1, _mm256_slli_epi64(o1, 32), 0xAA);
        x0 = _mm256_xor_si256(_mm256_xor_si256(hi1, x1), _mm256_set1_epi32((int)k0));
        x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), _mm256_set1_epi32((int)k1));
        x1 = lo1;
        x3 = lo0;
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
      }
      /* packus interleaves 128-bit halves; the permute puts the 16 numbers of two registers in order */
      const __m256i a = _mm256_permute4x64_epi64(
          _mm256_packus_epi32(noise_bits8(x0, knots), noise_bits8(x1, knots)), 0xD8);
      const __m256i b = _mm256_permute4x64_epi64(
          _mm256_packus_epi32(noise_bits8(x2, knots), noise_bits8(x3, knots)), 0xD8);
      const int64_t first = 32 * g;
      if (first >= start && first + 32 <= stop) {
        _mm256_storeu_si256((__m256i*)(hrow + first), a);
        _mm256_storeu_si256((__m256i*)(hrow + first + 16), b);
        if (frow) {
#if defined(__F16C__)
          for (int c = 0; c < 4; ++c)
            _mm256_storeu_ps(frow + first + 8 * c,
                             _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(hrow + first + 8 * c))));
#else
          for (int c = 0; c < 32; ++c) frow[first + c] = half_to_float(hrow[first + c]);
#endif
        }
      } else { /* a group cut by start or stop */
        uint16_t buf[32];
        _mm256_storeu_si256((__m256i*)buf, a);
        _mm256_storeu_si256((__m256i*)(buf + 16), b);
        const int64_t lo = first < start ? start : first, hi = first + 32 > stop ? stop : first + 32;
        for (int64_t k = lo; k < hi; ++k) {
          hrow[k] = buf[k - first];
          if (frow) frow[k] = half_to_float(buf[k - first]);
        }
      }
    }
  }
}
#endif
