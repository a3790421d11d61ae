// The scalar reference of libsirl_cpu (sirl_reference_logits_forward/backward): the contract of the C ABI computed
// with nothing but csrc/include/sirl/online_state.h, one element at a time on the calling thread. It is what the
// SIMD kernels (row_kernels.inc), the CUDA vector form (row_state.h) and the Triton kernels are tested against, so
// the softmax state has one source. Slow on purpose: no vector exp, no change of base. z = x * (1/T) is rounded
// per element, as torch.log_softmax(x / T) rounds it.
//
// Its stats are libsirl_cpu's, so that any forward of the library pairs with any backward of it (c_api.h): the row
// max in RAW logits (as the SIMD kernels keep it), then log sumexp. The header's state keeps the max of z; since
// rounding x * (1/T) is monotone, that max is exactly (float)(raw max * (1/T)), which the backward forms back.
#include "kernels.h"
#include "sirl/c_api.h"
#include "sirl/host_api.h"
#include "sirl/online_state.h"

namespace {

// Element conversions: the baseline build's scalar-exact ones (test_conversions_match_torch checks them bit for bit
// against torch for every 16-bit pattern), one element at a time.
float load(const sirl_rows& in, const void* base, int64_t index) {
  float value;
  const char* element = static_cast<const char*>(base) + index * static_cast<int64_t>(sirl::dtype_size(in.dtype));
  sirl_cpu::baseline::convert_array(in.dtype, element, SIRL_FLOAT32, &value, 1);
  return value;
}

void store(int32_t dtype, void* base, int64_t index, float value) {
  char* element = static_cast<char*>(base) + index * static_cast<int64_t>(sirl::dtype_size(dtype));
  sirl_cpu::baseline::convert_array(SIRL_FLOAT32, &value, dtype, element, 1);
}

// The max of row[0, vocab) in raw logits (NaN entries skipped: a NaN makes the whole row NaN anyway).
float raw_max(const sirl_rows& in, const void* row) {
  float m = -INFINITY;
  for (int64_t i = 0; i < in.vocab; ++i) {
    const float x = load(in, row, i);
    m = x > m ? x : m;
  }
  return m;
}

// The state of row[lo, hi) by pairwise merges over runs of at most 16 updates: nothing but the header's update and
// merge, in an order whose rounding grows with log V rather than V, so that it can judge long rows.
// State is sirl::OnlineState, or sirl::ExtState when self-certainty / varentropy are asked for.
template <typename State>
State pairwise_state(const sirl_rows& in, const void* row, float inv_t, int64_t lo, int64_t hi, State empty) {
  if (hi - lo <= 16) {
    State state = empty;
    for (int64_t i = lo; i < hi; ++i) state = sirl::update(state, load(in, row, i) * inv_t);
    return state;
  }
  const int64_t mid = lo + (hi - lo) / 2;
  return sirl::merge(pairwise_state(in, row, inv_t, lo, mid, empty), pairwise_state(in, row, inv_t, mid, hi, empty));
}

sirl::Status reference_forward(const sirl_forward_args& a, const sirl_launch&) {
  const float inv_t = sirl::inv_temperature(a.in);
  const size_t esize = sirl::dtype_size(a.in.dtype);
  for (int64_t r = 0; r < a.in.rows; ++r) {
    const char* row = static_cast<const char*>(a.in.logits) + r * a.in.row_stride * static_cast<int64_t>(esize);
    const int64_t y = sirl::label_column(a.in, r);
    sirl::RowResult res = y == sirl::kIgnoredRow ? sirl::ignored_row() : sirl::bad_label_row();
    sirl::ExtraResult extra = y == sirl::kIgnoredRow ? sirl::ignored_extras() : sirl::bad_label_extras();
    if (y >= 0) {
      sirl::OnlineState st;
      if (sirl::wants_extras(a)) {
        const sirl::ExtState ext = pairwise_state(a.in, row, inv_t, 0, a.in.vocab, sirl::ext_empty_state());
        st = ext.s;
        extra = sirl::finalize_extras(ext.s, ext.x);
      } else {
        st = pairwise_state(a.in, row, inv_t, 0, a.in.vocab, sirl::empty_state());
      }
      res = sirl::finalize(st, load(a.in, row, y) * inv_t);
      if (res.max == res.max) res.max = raw_max(a.in, row);  // the library's unit (NaN stats stay NaN)
    }
    if (a.self_certainty) a.self_certainty[r] = extra.self_certainty;
    if (a.varentropy) a.varentropy[r] = extra.varentropy;
    a.logprobs[r] = res.logprob;
    a.entropy[r] = res.entropy;
    a.stats[2 * r] = res.max;
    a.stats[2 * r + 1] = res.log_sum;
  }
  return sirl::ok();
}

sirl::Status reference_backward(const sirl_backward_args& a, const sirl_launch&) {
  const float inv_t = sirl::inv_temperature(a.in);
  const int64_t esize = static_cast<int64_t>(sirl::dtype_size(a.in.dtype));
  for (int64_t r = 0; r < a.in.rows; ++r) {
    const char* row = static_cast<const char*>(a.in.logits) + r * a.in.row_stride * esize;
    char* out = static_cast<char*>(a.grad_logits) + r * a.grad_row_stride * esize;
    const int64_t y = sirl::label_column(a.in, r);
    if (y < 0) {
      for (int64_t i = 0; i < a.in.vocab; ++i) store(a.in.dtype, out, i, y == sirl::kIgnoredRow ? 0.0f : NAN);
      continue;
    }
    const float m = a.stats[2 * r] * inv_t, log_sum = a.stats[2 * r + 1];  // the max of z, as the forward had it
    const float alpha = a.alpha[r], beta = a.beta[r], lam = a.lam[r];
    const bool terms = sirl::has_extra_terms(a);
    const float gamma = a.gamma ? a.gamma[r] : 0.0f, delta = a.delta ? a.delta[r] : 0.0f;
    const float logp_y = sirl::log_prob(load(a.in, row, y) * inv_t, m, log_sum);  // before an in-place overwrite
    for (int64_t i = 0; i < a.in.vocab; ++i) {
      const float logp = sirl::log_prob(load(a.in, row, i) * inv_t, m, log_sum);
      const float g = terms ? sirl::grad_nonlabel(logp, alpha, beta, gamma, delta, inv_t)
                            : sirl::grad_nonlabel(logp, alpha, beta, inv_t);
      store(a.in.dtype, out, i, i == y ? 0.0f : g);
    }
    store(a.in.dtype, out, y,
          terms ? sirl::grad_label(logp_y, alpha, beta, lam, gamma, delta, inv_t)
                : sirl::grad_label(logp_y, alpha, beta, lam, inv_t));
  }
  return sirl::ok();
}

}  // namespace

extern "C" {

// The same checked path as sirl_logits_forward/backward (run_checked), errors under the reference's own names.
SIRL_API int32_t sirl_reference_logits_forward(const sirl_forward_args* args, const sirl_launch* launch) {
  const char* fn = "sirl_reference_logits_forward";
  return sirl::run_checked(fn, fn, args, launch, reference_forward);
}

SIRL_API int32_t sirl_reference_logits_backward(const sirl_backward_args* args, const sirl_launch* launch) {
  const char* fn = "sirl_reference_logits_backward";
  return sirl::run_checked(fn, fn, args, launch, reference_backward);
}

}  // extern "C"
