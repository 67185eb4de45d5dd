//! Reading the next decoder layer while the current one computes (issue 10, "pipeline overlap").
//!
//! Loading a layer is host work — memory-mapped safetensors pages, bf16/f16 → f32 conversion, or a
//! GPTQ checkpoint's dequantization — about 0.9 GB of f32 per Llama-3-8B layer. The GPU does not
//! need the host for that time, so the layer loop asks for layer `i` and a second thread is already
//! reading layer `i + 1`. The cost is one extra layer of host memory. The GPU upload is the
//! caller's: the quantization driver uploads layer `i + 1` on a thread of its own during layer
//! `i`'s last stage when its memory plan allows (`MemoryPlan::weights_ahead`).

use std::thread::{Scope, ScopedJoinHandle};

use super::LayerWeights;
use super::WeightSource;
use super::weights::WeightError;

type Pending<'scope> = (
    usize,
    ScopedJoinHandle<'scope, Result<LayerWeights, WeightError>>,
);

/// Layers of `source`, each read one step ahead on a scoped thread. Create it inside
/// [`std::thread::scope`]; leaving the scope waits for a read still in flight (after an error or a
/// cancellation), so no thread outlives the borrow of `source`.
pub struct LayerPrefetch<'scope, 'env> {
    scope: &'scope Scope<'scope, 'env>,
    source: &'env dyn WeightSource,
    layers: usize,
    pending: Option<Pending<'scope>>,
}

impl<'scope, 'env> LayerPrefetch<'scope, 'env> {
    /// Starts reading layer 0 right away.
    pub fn new(scope: &'scope Scope<'scope, 'env>, source: &'env dyn WeightSource) -> Self {
        let layers = source.config().num_layers;
        let mut p = Self {
            scope,
            source,
            layers,
            pending: None,
        };
        p.start(0);
        p
    }

    fn start(&mut self, index: usize) {
        if index < self.layers {
            let source = self.source;
            self.pending = Some((index, self.scope.spawn(move || source.layer(index))));
        }
    }

    /// Layer `index`, and starts reading `index + 1`. Layers are expected in order; any other
    /// index is read synchronously (correct, just not overlapped).
    pub fn layer(&mut self, index: usize) -> Result<LayerWeights, WeightError> {
        let lw = match self.pending.take() {
            Some((i, handle)) if i == index => handle.join().unwrap_or_else(|_| {
                Err(WeightError::File {
                    path: self.source.describe(),
                    message: format!("the thread reading layer {index} panicked"),
                })
            }),
            // A read of another layer is dropped here: the scope still joins its thread.
            _ => self.source.layer(index),
        };
        self.start(index + 1);
        lw
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
}
