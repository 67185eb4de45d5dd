//! Reading the next decoder layer while the current one computes (issue 10, "pipeline overlap").
//!
//! Loading a layer is host work — memory-mapped safetensors pages, bf16/f16 → f32 conversion, or a
//! GPTQ checkpoint's dequantization — about 0.9 GB of f32 per Llama-3-8B layer. The GPU does not
//! need the host for that time, so the layer loop asks for layer `i` and a second thread is already
//! reading layer `i + 1`. The cost is one extra layer of host memory.
//!
//! [`LayerPrefetch::with`] also runs a caller's step on each layer on that thread, after reading
//! it: the quantization driver uses it to upload the next layer's weights to the GPU while the
//! current one computes, when its memory plan has room (`MemoryPlan::weights_ahead`; wgpu's
//! device and queue are shared between threads, its error scopes are per thread). Otherwise the
//! GPU upload stays on the loop's thread.

use std::thread::{Scope, ScopedJoinHandle};

use super::LayerWeights;
use super::WeightSource;
use super::weights::WeightError;

type Pending<'scope, T> = (
    usize,
    ScopedJoinHandle<'scope, Result<(LayerWeights, T), WeightError>>,
);

/// The step run on each layer after reading it: `(index, &weights) → T`.
pub type Then<'env, T> = &'env (dyn Fn(usize, &LayerWeights) -> T + Sync);

fn nothing(_: usize, _: &LayerWeights) {}

/// Layers of `source`, each read one step ahead on a scoped thread (and passed through `then`
/// there). Create it inside [`std::thread::scope`]; leaving the scope waits for a read still in
/// flight (after an error or a cancellation), so no thread outlives the borrow of `source`.
pub struct LayerPrefetch<'scope, 'env, T: Send + 'scope = ()> {
    scope: &'scope Scope<'scope, 'env>,
    source: &'env dyn WeightSource,
    then: Then<'env, T>,
    layers: usize,
    pending: Option<Pending<'scope, T>>,
}

impl<'scope, 'env> LayerPrefetch<'scope, 'env, ()> {
    /// Starts reading layer 0 right away.
    pub fn new(scope: &'scope Scope<'scope, 'env>, source: &'env dyn WeightSource) -> Self {
        Self::with(scope, source, &nothing)
    }

    /// Layer `index`, and starts reading `index + 1`. Layers are expected in order; any other
    /// index is read synchronously (correct, just not overlapped).
    pub fn layer(&mut self, index: usize) -> Result<LayerWeights, WeightError> {
        Ok(self.layer_with(index)?.0)
    }
}

impl<'scope, 'env, T: Send + 'scope> LayerPrefetch<'scope, 'env, T> {
    /// As [`LayerPrefetch::new`], running `then` on every layer on the reading thread.
    pub fn with(
        scope: &'scope Scope<'scope, 'env>,
        source: &'env dyn WeightSource,
        then: Then<'env, T>,
    ) -> Self {
        let layers = source.config().num_layers;
        let mut p = Self {
            scope,
            source,
            then,
            layers,
            pending: None,
        };
        p.start(0);
        p
    }

    fn start(&mut self, index: usize) {
        if index < self.layers {
            let (source, then) = (self.source, self.then);
            self.pending = Some((
                index,
                self.scope.spawn(move || {
                    let lw = source.layer(index)?;
                    let t = then(index, &lw);
                    Ok((lw, t))
                }),
            ));
        }
    }

    /// Layer `index` and what `then` made of it, and starts on `index + 1`. Layers are expected
    /// in order; any other index is read (and passed through `then`) synchronously.
    pub fn layer_with(&mut self, index: usize) -> Result<(LayerWeights, T), WeightError> {
        let out = match self.pending.take() {
            Some((i, handle)) if i == index => handle.join().unwrap_or_else(|_| {
                Err(WeightError::File {
                    path: self.source.describe(),
                    message: format!("the thread reading layer {index} panicked"),
                })
            }),
            // A read of another layer is dropped here: the scope still joins its thread.
            _ => self.source.layer(index).map(|lw| {
                let t = (self.then)(index, &lw);
                (lw, t)
            }),
        };
        self.start(index + 1);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::SyntheticModel;

    #[test]
    fn prefetched_layers_equal_direct_reads() -> Result<(), Box<dyn std::error::Error>> {
        let m = SyntheticModel::new(3);
        let n = m.config().num_layers;
        std::thread::scope(|s| -> Result<(), Box<dyn std::error::Error>> {
            let mut p = LayerPrefetch::new(s, &m);
            for i in 0..n {
                let got = p.layer(i)?;
                let want = m.layer(i)?;
                assert_eq!(got.q.weight, want.q.weight, "layer {i} q_proj");
                assert_eq!(got.down.weight, want.down.weight, "layer {i} down_proj");
            }
            // Out of order: still the right layer, read directly.
            assert_eq!(p.layer(0)?.up.weight, m.layer(0)?.up.weight);
            // Past the end: the source's own error, not a panic.
            assert!(p.layer(n).is_err());
            Ok(())
        })
    }

    /// `then` runs once per layer, on the reading thread (not the caller's) when the layers
    /// come in order, and its result comes back with the layer it was given.
    #[test]
    fn then_runs_on_the_reading_thread() -> Result<(), Box<dyn std::error::Error>> {
        let m = SyntheticModel::new(5);
        let n = m.config().num_layers;
        let caller = std::thread::current().id();
        let step =
            |i: usize, lw: &LayerWeights| (i, lw.q.weight.len(), std::thread::current().id());
        std::thread::scope(|s| -> Result<(), Box<dyn std::error::Error>> {
            let mut p = LayerPrefetch::with(s, &m, &step);
            for i in 0..n {
                let (lw, (j, len, thread)) = p.layer_with(i)?;
                assert_eq!((j, len), (i, lw.q.weight.len()), "layer {i}");
                assert_ne!(
                    thread, caller,
                    "layer {i}: `then` ran on the caller's thread"
                );
                assert_eq!(lw.q.weight, m.layer(i)?.q.weight, "layer {i} q_proj");
            }
            // Out of order: read and passed through `then` on the caller's thread.
            let (_, (j, _, thread)) = p.layer_with(1)?;
            assert_eq!((j, thread), (1, caller));
            Ok(())
        })
    }
}
