// optim_update.cuh -- one parameter's optimizer update, shared by optim.cu (adam_step / sgd_step) and
// step_update.cu (step_adam / step_sgd), so the two give the same bits for the same gradient.
//
//   adam1  g' = g + wd*p; m = b1*m + (1-b1)*g'; v = b2*v + (1-b2)*g'^2; p -= lr*(m/bc1)/(sqrt(v/bc2) + eps)
//   sgd1   m = momentum*m + g + wd*p; p -= lr*m
#pragma once

__device__ __forceinline__ void adam1(float& p, float g, float& m, float& v, float lr, float beta1, float beta2,
                                      float eps, float wd, float bc1, float bc2) {
    const float gi = g + wd * p;
    m = beta1 * m + (1.0f - beta1) * gi;
    v = beta2 * v + (1.0f - beta2) * gi * gi;
    p -= lr * (m / bc1) / (sqrtf(v / bc2) + eps);
}

__device__ __forceinline__ void sgd1(float& p, float g, float& m, float lr, float momentum, float wd) {
    m = momentum * m + g + wd * p;
    p -= lr * m;
}
