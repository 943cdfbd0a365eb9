// Per-channel batch normalisation, 2x2 max pooling and ReLU in two passes over the input
// (statistics, then pooling), and the gradient in one: hmaml/models/fused.py says why and when.
//
// x is [N, C, H, W] in channels-last memory ([N, H, W, C]); channels are the tasks' channels
// side by side, so every (task, channel) pair is one channel here. Arithmetic is in float
// (double for double inputs); bf16 values are converted on load and rounded to nearest even on
// store. The window's maximum is taken on sign(weight) * x, which is the maximum of the
// normalised output whatever the sign of the weight; ties go to the first position in scan
// order, as max_pool2d's.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// Every loop over the channels carries "#pragma GCC ivdep": its arrays never overlap, and without
// it GCC guards the vectorised loop with an overlap check that can send it to the scalar one.
//
// Loads and stores on the raw storage (bf16 as its 16 bits), written so that GCC vectorises them.
template <typename T> struct Raw { using type = T; using acc = float; };
template <> struct Raw<double> { using type = double; using acc = double; };
template <> struct Raw<c10::BFloat16> { using type = uint16_t; using acc = float; };

inline float load(uint16_t v) { return std::bit_cast<float>(static_cast<uint32_t>(v) << 16); }
inline float load(float v) { return v; }
inline double load(double v) { return v; }

template <typename R> inline R store(typename std::conditional_t<std::is_same_v<R, double>,
                                                                 double, float> v) {
  if constexpr (std::is_same_v<R, uint16_t>) {  // round to nearest even
    const uint32_t bits = std::bit_cast<uint32_t>(v);
    return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  } else {
    return static_cast<R>(v);
  }
}

template <typename scalar_t> auto raw(const at::Tensor& t) {
  return reinterpret_cast<typename Raw<scalar_t>::type*>(t.data_ptr<scalar_t>());
}

constexpr int64_t kRows = 64;  // rows per partial statistic: 64 x C values stay in L2

void check_input(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "bn_pool_relu: expected [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "bn_pool_relu: CPU tensors only");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "bn_pool_relu: the input must be channels-last");
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, "bn_pool_relu: H and W must be >= 2");
}

template <typename scalar_t, bool Save>
void forward_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  double eps, at::Tensor& out, at::Tensor& xhat, at::Tensor& argmax,
                  at::Tensor& mean_t, at::Tensor& invstd_t) {
  using raw_t = typename Raw<scalar_t>::type;
  using acc_t = typename Raw<scalar_t>::acc;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = H / 2, Wo = W / 2, R = N * H * W;
  const raw_t* __restrict__ xp = raw<scalar_t>(x);
  const acc_t* __restrict__ wp = weight.data_ptr<acc_t>();
  const acc_t* __restrict__ bp = bias.data_ptr<acc_t>();
  acc_t* __restrict__ mean = mean_t.data_ptr<acc_t>();
  acc_t* __restrict__ invstd = invstd_t.data_ptr<acc_t>();

  // statistics: mean and M2 of every block of kRows rows (two passes in cache), then merged
  const int64_t blocks = (R + kRows - 1) / kRows;
  std::vector<acc_t> bmean(blocks * C), bm2(blocks * C);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * kRows, r1 = std::min(R, r0 + kRows);
      acc_t* __restrict__ m = bmean.data() + blk * C;
      acc_t* __restrict__ m2 = bm2.data() + blk * C;
      #pragma GCC ivdep
      for (int64_t c = 0; c < C; ++c) m[c] = 0;
      for (int64_t r = r0; r < r1; ++r) {
        const raw_t* __restrict__ row = xp + r * C;
        #pragma GCC ivdep
        for (int64_t c = 0; c < C; ++c) m[c] += load(row[c]);
      }
      const acc_t inv_n = acc_t(1) / acc_t(r1 - r0);
      #pragma GCC ivdep
      for (int64_t c = 0; c < C; ++c) {
        m[c] *= inv_n;
        m2[c] = 0;
      }
      for (int64_t r = r0; r < r1; ++r) {
        const raw_t* __restrict__ row = xp + r * C;
        #pragma GCC ivdep
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = load(row[c]) - m[c];
          m2[c] += d * d;
        }
      }
    }
  });
  at::parallel_for(0, C, 256, [&](int64_t begin, int64_t end) {
    const int64_t width = end - begin;
    std::vector<acc_t> mu_v(width, 0), m2_v(width, 0);
    acc_t* __restrict__ mu = mu_v.data();
    acc_t* __restrict__ M2 = m2_v.data();
    acc_t n = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const acc_t nb = acc_t(std::min(R, (blk + 1) * kRows) - blk * kRows);
      const acc_t total = n + nb, frac = nb / total, cross = n * nb / total;
      const acc_t* __restrict__ m = bmean.data() + blk * C + begin;
      const acc_t* __restrict__ m2 = bm2.data() + blk * C + begin;
      #pragma GCC ivdep
      for (int64_t c = 0; c < width; ++c) {
        const acc_t delta = m[c] - mu[c];
        mu[c] += delta * frac;
        M2[c] += m2[c] + delta * delta * cross;
      }
      n = total;
    }
    #pragma GCC ivdep
    for (int64_t c = 0; c < width; ++c) {
      mean[begin + c] = mu[c];
      invstd[begin + c] = acc_t(1) / std::sqrt(M2[c] / acc_t(R) + acc_t(eps));
    }
  });

  // pooling on sign(weight) * x, then the affine map and the ReLU on the quarter grid
  std::vector<acc_t> sign_v(C);
  #pragma GCC ivdep
  for (int64_t c = 0; c < C; ++c) sign_v[c] = wp[c] >= 0 ? acc_t(1) : acc_t(-1);
  const acc_t* __restrict__ sign = sign_v.data();
  raw_t* __restrict__ op = raw<scalar_t>(out);
  acc_t* __restrict__ xhp = Save ? xhat.data_ptr<acc_t>() : nullptr;
  uint8_t* __restrict__ ap = Save ? argmax.data_ptr<uint8_t>() : nullptr;
  at::parallel_for(0, N * Ho, 1, [&](int64_t begin, int64_t end) {
    // a row's window positions and x-hat values first go to buffers of floats, then to their
    // outputs: stored in the main loop, they made it 5x slower
    std::vector<acc_t> where_v(Save ? C : 0), xh_v(Save ? C : 0);
    acc_t* __restrict__ where = where_v.data();
    acc_t* __restrict__ xh_row = xh_v.data();
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / Ho, ho = i % Ho;
      for (int64_t wo = 0; wo < Wo; ++wo) {
        const raw_t* __restrict__ p0 = xp + ((n * H + 2 * ho) * W + 2 * wo) * C;
        const raw_t* __restrict__ p1 = p0 + C;
        const raw_t* __restrict__ p2 = p0 + W * C;
        const raw_t* __restrict__ p3 = p2 + C;
        const int64_t q = ((n * Ho + ho) * Wo + wo) * C;
        raw_t* __restrict__ o = op + q;
        acc_t* __restrict__ xo = Save ? xhp + q : nullptr;
        #pragma GCC ivdep
        for (int64_t c = 0; c < C; ++c) {
          const acc_t s = sign[c];
          const acc_t v0 = load(p0[c]), v1 = load(p1[c]), v2 = load(p2[c]), v3 = load(p3[c]);
          const acc_t a0 = s * v0, a1 = s * v1, a2 = s * v2, a3 = s * v3;
          // the first maximum in scan order, as max_pool2d takes it; a NaN wins, as there, so
          // that a non-finite input reaches the loss (and the run's non-finite stop)
          const bool m1 = a1 > a0 || a1 != a1;
          const acc_t b01 = m1 ? a1 : a0, x01 = m1 ? v1 : v0;
          const bool m2 = a2 > b01 || a2 != a2;
          const acc_t b012 = m2 ? a2 : b01, x012 = m2 ? v2 : x01;
          const bool m3 = a3 > b012 || a3 != a3;
          const acc_t xb = m3 ? v3 : x012;
          const acc_t xh = (xb - mean[c]) * invstd[c];
          const acc_t z = wp[c] * xh + bp[c];
          o[c] = store<raw_t>(z <= 0 ? acc_t(0) : z);  // NaN passes, as in relu
          if constexpr (Save) {
            xh_row[c] = xh;
            where[c] = m3 ? acc_t(3) : (m2 ? acc_t(2) : (m1 ? acc_t(1) : acc_t(0)));
          }
        }
        if constexpr (Save) {
          uint8_t* __restrict__ a = ap + q;
          #pragma GCC ivdep
          for (int64_t c = 0; c < C; ++c) a[c] = static_cast<uint8_t>(where[c]);
          #pragma GCC ivdep
          for (int64_t c = 0; c < C; ++c) xo[c] = xh_row[c];
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const at::Tensor& g, const at::Tensor& x, const at::Tensor& out,
                   const at::Tensor& xhat, const at::Tensor& argmax, const at::Tensor& mean_t,
                   const at::Tensor& invstd_t, const at::Tensor& weight, at::Tensor& dx,
                   at::Tensor& dweight, at::Tensor& dbias) {
  using raw_t = typename Raw<scalar_t>::type;
  using acc_t = typename Raw<scalar_t>::acc;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = H / 2, Wo = W / 2, R = N * H * W, Q = N * Ho * Wo;
  const raw_t* __restrict__ gp = raw<scalar_t>(g);
  const raw_t* __restrict__ xp = raw<scalar_t>(x);
  const raw_t* __restrict__ op = raw<scalar_t>(out);
  const acc_t* __restrict__ xhp = xhat.data_ptr<acc_t>();
  const uint8_t* __restrict__ ap = argmax.data_ptr<uint8_t>();
  const acc_t* __restrict__ mean = mean_t.data_ptr<acc_t>();
  const acc_t* __restrict__ invstd = invstd_t.data_ptr<acc_t>();
  const acc_t* __restrict__ wp = weight.data_ptr<acc_t>();

  // on the quarter grid: A = sum of the gradient past the ReLU, B = its sum times x-hat
  const int64_t blocks = (Q + kRows - 1) / kRows;
  std::vector<acc_t> ba(blocks * C), bb(blocks * C);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      acc_t* __restrict__ a = ba.data() + blk * C;
      acc_t* __restrict__ b = bb.data() + blk * C;
      #pragma GCC ivdep
      for (int64_t c = 0; c < C; ++c) a[c] = b[c] = 0;
      for (int64_t r = blk * kRows; r < std::min(Q, (blk + 1) * kRows); ++r) {
        const raw_t* __restrict__ gr = gp + r * C;
        const raw_t* __restrict__ orow = op + r * C;
        const acc_t* __restrict__ xr = xhp + r * C;
        #pragma GCC ivdep
        for (int64_t c = 0; c < C; ++c) {
          const acc_t gv = load(orow[c]) <= 0 ? acc_t(0) : load(gr[c]);
          a[c] += gv;
          b[c] += gv * xr[c];
        }
      }
    }
  });
  acc_t* __restrict__ A = dbias.data_ptr<acc_t>();
  acc_t* __restrict__ B = dweight.data_ptr<acc_t>();
  #pragma GCC ivdep
  for (int64_t c = 0; c < C; ++c) A[c] = B[c] = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    #pragma GCC ivdep
    for (int64_t c = 0; c < C; ++c) {
      A[c] += ba[blk * C + c];
      B[c] += bb[blk * C + c];
    }
  }
  // dx = w r (scatter(g') - A / R - x-hat B / R)
  std::vector<acc_t> scale_v(C), k0_v(C), k1_v(C);
  #pragma GCC ivdep
  for (int64_t c = 0; c < C; ++c) {
    scale_v[c] = wp[c] * invstd[c];
    k0_v[c] = -scale_v[c] * A[c] / acc_t(R);
    k1_v[c] = -scale_v[c] * B[c] / acc_t(R);
  }
  const acc_t* __restrict__ scale = scale_v.data();
  const acc_t* __restrict__ k0 = k0_v.data();
  const acc_t* __restrict__ k1 = k1_v.data();
  raw_t* __restrict__ dp = raw<scalar_t>(dx);
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / H, h = i % H;
      for (int64_t w = 0; w < W; ++w) {
        const raw_t* __restrict__ xr = xp + ((n * H + h) * W + w) * C;
        raw_t* __restrict__ dr = dp + ((n * H + h) * W + w) * C;
        if (h >= 2 * Ho || w >= 2 * Wo) {  // outside every window: statistics only
          #pragma GCC ivdep
          for (int64_t c = 0; c < C; ++c) {
            const acc_t xh = (load(xr[c]) - mean[c]) * invstd[c];
            dr[c] = store<raw_t>(k1[c] * xh + k0[c]);
          }
          continue;
        }
        const int64_t q = ((n * Ho + h / 2) * Wo + w / 2) * C;
        const raw_t* __restrict__ gq = gp + q;
        const raw_t* __restrict__ oq = op + q;
        const uint8_t* __restrict__ aq = ap + q;
        const uint8_t here = static_cast<uint8_t>((h % 2) * 2 + (w % 2));
        #pragma GCC ivdep
        for (int64_t c = 0; c < C; ++c) {
          const acc_t xh = (load(xr[c]) - mean[c]) * invstd[c];
          const acc_t gv = (aq[c] == here && !(load(oq[c]) <= 0)) ? load(gq[c]) : acc_t(0);
          dr[c] = store<raw_t>(scale[c] * gv + k1[c] * xh + k0[c]);
        }
      }
    }
  });
}

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& bias, double eps, bool save) {
  check_input(x);
  const int64_t N = x.size(0), C = x.size(1), Ho = x.size(2) / 2, Wo = x.size(3) / 2;
  auto acc = x.options().dtype(acc_type(x));
  auto w = weight.to(acc_type(x)).contiguous(), b = bias.to(acc_type(x)).contiguous();
  TORCH_CHECK(w.numel() == C && b.numel() == C, "bn_pool_relu: weight and bias need ", C,
              " values");
  auto mean = at::empty({C}, acc), invstd = at::empty({C}, acc);
  auto out = at::empty({N, C, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  // x-hat at each maximum, kept in float: the weight's gradient sums it over the batch
  auto xhat = save ? at::empty_like(out, acc) : at::empty({0}, acc);
  auto argmax = save ? at::empty({N, Ho, Wo, C}, x.options().dtype(at::kByte))
                     : at::empty({0}, x.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bn_pool_relu_forward", [&] {
    if (save) {
      forward_impl<scalar_t, true>(x, w, b, eps, out, xhat, argmax, mean, invstd);
    } else {
      forward_impl<scalar_t, false>(x, w, b, eps, out, xhat, argmax, mean, invstd);
    }
  });
  return {out, xhat, argmax, mean, invstd};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x,
                                 const at::Tensor& out, const at::Tensor& xhat,
                                 const at::Tensor& argmax, const at::Tensor& mean,
                                 const at::Tensor& invstd, const at::Tensor& weight) {
  check_input(x);
  auto g = grad_out.to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
  auto w = weight.to(acc_type(x)).contiguous();
  auto dx = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto dweight = at::empty({x.size(1)}, x.options().dtype(acc_type(x)));
  auto dbias = at::empty_like(dweight);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bn_pool_relu_backward", [&] {
    backward_impl<scalar_t>(g, x, out, xhat, argmax, mean, invstd, w, dx, dweight, dbias);
  });
  return {dx, dweight, dbias};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "batch norm + 2x2 max pool + ReLU, channels-last (CPU)");
  m.def("backward", &backward, "its gradient");
}
