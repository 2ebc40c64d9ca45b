//! AdamW's update of one tensor in one kernel (CubeCL, WebGPU / Vulkan), as torch's
//! `AdamW(fused=True)` does it: the reference ([`super::optim::AdamW`]'s tensor ops) launches
//! 14 element-wise kernels per tensor and the gradient clipping one more; this launches one,
//! which reads the parameter, its gradient, both moments and the clipping coefficient once and
//! writes the three new tensors. The arithmetic is the reference's, operation for operation,
//! in f32 (`tests/lora.rs` compares the two).

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use cubecl::prelude::{CubeCount, CubeDim};

/// Threads per workgroup, one element each.
const THREADS: u32 = 256;

/// WebGPU's smallest guaranteed `maxComputeWorkgroupsPerDimension`.
const MAX_GROUPS: u32 = 65_535;

/// The step's constants, as the reference computes them (in f64, then used as f32 scalars).
#[derive(Debug, Clone, Copy)]
pub struct AdamWSpec {
    /// `1 − β₁`.
    pub one_minus_beta1: f32,
    pub beta2: f32,
    /// `1 − β₂`.
    pub one_minus_beta2: f32,
    /// `1 − lr · weight_decay` (1: no decay).
    pub decay: f32,
    /// `√(1 − β₂ᵗ)`.
    pub bc2_sqrt: f32,
    pub eps: f32,
    /// `lr / (1 − β₁ᵗ)`.
    pub step_size: f32,
}

mod gpu {
    use cubecl::prelude::*;

    /// Element `i`: `g = grad·coef[0]` (`grad` when not `clipped`; `coef` is then not read),
    /// `m' = m + (g − m)(1 − β₁)`, `v' = v·β₂ + (g·g)(1 − β₂)`,
    /// `p' = p·decay − (m' / (√v' / bc2 + eps))·step_size`. Launched unchecked: the one read
    /// and write per tensor is guarded by `i < n`.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_kernel(
        p: &Tensor<f32>,
        g: &Tensor<f32>,
        m: &Tensor<f32>,
        v: &Tensor<f32>,
        coef: &Tensor<f32>,
        p_out: &mut Tensor<f32>,
        m_out: &mut Tensor<f32>,
        v_out: &mut Tensor<f32>,
        n: u32,
        one_minus_beta1: f32,
        beta2: f32,
        one_minus_beta2: f32,
        decay: f32,
        bc2_sqrt: f32,
        eps: f32,
        step_size: f32,
        #[comptime] clipped: bool,
    ) {
        let i = ((CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X) as usize;
        if i < n as usize {
            let mut gi = g[i];
            if clipped {
                gi *= coef[0];
            }
            let mi = m[i] + (gi - m[i]) * one_minus_beta1;
            let vi = v[i] * beta2 + (gi * gi) * one_minus_beta2;
            let denom = f32::sqrt(vi) / bc2_sqrt + eps;
            p_out[i] = p[i] * decay - (mi / denom) * step_size;
            m_out[i] = mi;
            v_out[i] = vi;
        }
    }
}

/// The fused update as a Burn backend operation (CubeCL devices only; the optimizer's tensors
/// carry no autodiff).
#[backend_extension(Cube)]
pub trait FusedAdamWOps: Backend {
    /// `(p', m', v')` from the parameter, its gradient, the moments (all of one shape, f32) and
    /// the clipping coefficient `coef` [1] (read only when `clipped`).
    #[allow(clippy::type_complexity)]
    fn adamw_update(
        p: FloatTensor<Self>,
        g: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        coef: FloatTensor<Self>,
        spec: AdamWSpec,
        clipped: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

type Cube = FloatTensor<CubeBackend>;

impl FusedAdamWOps for CubeBackend {
    fn adamw_update(p: Cube, g: Cube, m: Cube, v: Cube, coef: Cube, spec: AdamWSpec, clipped: bool) -> (Cube, Cube, Cube) {
        let (p, g, m, v, coef) = (into_contiguous(p), into_contiguous(g), into_contiguous(m), into_contiguous(v), into_contiguous(coef));
        let shape = p.meta.shape().clone();
        let n = shape.num_elements();
        let out = || empty_device_dtype(p.client.clone(), p.device.clone(), shape.clone(), DType::F32);
        let (p_out, m_out, v_out) = (out(), out(), out());
        let groups = (n as u32).div_ceil(THREADS).max(1);
        let count = CubeCount::Static(groups.min(MAX_GROUPS), groups.div_ceil(MAX_GROUPS), 1);
        // SAFETY: all five inputs and three outputs are contiguous f32 buffers of `n` elements
        // (`coef` of at least one), and the kernel guards its one index by `n`.
        unsafe {
            gpu::adamw_kernel::launch_unchecked(
                &p.client.clone(),
                count,
                CubeDim::new_1d(THREADS),
                p.into_tensor_arg(),
                g.into_tensor_arg(),
                m.into_tensor_arg(),
                v.into_tensor_arg(),
                coef.into_tensor_arg(),
                p_out.clone().into_tensor_arg(),
                m_out.clone().into_tensor_arg(),
                v_out.clone().into_tensor_arg(),
                n as u32,
                spec.one_minus_beta1,
                spec.beta2,
                spec.one_minus_beta2,
                spec.decay,
                spec.bc2_sqrt,
                spec.eps,
                spec.step_size,
                clipped,
            );
        }
        (p_out, m_out, v_out)
    }
}

/// `(p', m', v')` of one AdamW step in one kernel, the gradient first multiplied by `coef` [1]
/// when given. The caller checks [`applies`].
pub fn update(p: Tensor<2>, g: Tensor<2>, m: Tensor<2>, v: Tensor<2>, coef: Option<Tensor<1>>, spec: AdamWSpec) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
    // Unclipped, the kernel reads no coefficient: the gradient stands in for its binding.
    let clipped = coef.is_some();
    let coef = coef.unwrap_or_else(|| g.clone().flatten::<1>(0, 1));
    let (p2, m2, v2) = Dispatch::adamw_update(p.into_dispatch(), g.into_dispatch(), m.into_dispatch(), v.into_dispatch(), coef.into_dispatch(), spec, clipped);
    (Tensor::from_dispatch(p2), Tensor::from_dispatch(m2), Tensor::from_dispatch(v2))
}

/// Whether the kernel takes this parameter: f32 on a CubeCL device.
pub fn applies(p: &Tensor<2>) -> bool {
    p.dtype() == DType::F32 && crate::quant::kernel::runs_kernel(&p.device())
}
