//! wgpu context, buffers, pipeline cache, kernels.
