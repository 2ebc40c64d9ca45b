//! Training: data to batches, the causal-LM loss, sequence classification (`classify`), contrastive
//! embedding tuning (`contrastive`), AdamW with torch's semantics (`adamw_kernel`: its update in one kernel per tensor), learning
//! rate schedules with transformers' semantics, the step loop (accumulation, clipping),
//! gradient checkpointing (`recompute`) and loss scaling over an f16 base (`scaler`).

pub mod adamw_kernel;
pub mod checkpoint;
pub mod classify;
pub mod contrastive;
pub mod data;
pub mod flops;
pub mod loss;
pub mod memory;
pub mod optim;
pub mod privacy;
pub mod recompute;
pub mod scaler;
pub mod schedule;
pub mod trainer;

pub use data::{Batch, Example, Tokenized};
pub use optim::{AdamW, AdamWConfig};
pub use schedule::Schedule;
pub use trainer::{StepStats, TrainConfig, Trainer};
