//! IA3 (Liu et al. 2022, "(IA)^3"): learned vectors that rescale activations, with peft's
//! semantics: on a non-feed-forward target the output is scaled, `y = base(x) * l`
//! (l: [out]); on a feed-forward target the input is, `y = base(x * l)` (l: [in]).
//! Initialised to ones, so a fresh adapter changes nothing.

pub mod config;
pub mod model;

pub use config::Ia3Config;
pub use model::Ia3Adapter;
