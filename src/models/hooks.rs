//! The seam between a frozen model and the PEFT methods that modify it: a model calls its
//! adapter around every linear projection and asks it for virtual tokens; a method (LoRA,
//! IA3, prompt tuning, ...) implements the hooks it needs. Keeping this a small trait lets
//! every method plug into every architecture without touching either.

use burn::tensor::{Int, Tensor};

/// The projections of a transformer block, by their Hugging Face module names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    /// Queries, keys and values in one fused projection (GPT-2's `attn.c_attn`).
    Qkv,
}

impl Proj {
    /// A Llama block's projections.
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];
    /// A GPT-2 block's: `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`.
    pub const GPT2: [Proj; 4] = [Proj::Qkv, Proj::O, Proj::Up, Proj::Down];

    /// Dotted module path under a Llama decoder layer, e.g. `self_attn.q_proj`.
    pub fn module_path(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
            Proj::Qkv => "self_attn.qkv_proj",
        }
    }
}

/// Which architecture a [`Site`] belongs to: it decides the module names (and so the keys of
/// saved adapters and what `target_modules` match).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Family {
    /// Llama-style decoders: `model.layers.{l}.self_attn.q_proj`, ...
    #[default]
    Llama,
    /// BERT-style encoders: `{prefix}encoder.layer.{l}.attention.self.query`, ...; `prefix` is
    /// `"bert."` inside `BertForSequenceClassification`, `""` in a bare `BertModel`.
    Bert { prefix: &'static str },
    /// GPT-2: `transformer.h.{l}.attn.c_attn`, ... (Conv1D layers).
    Gpt2,
    /// ViT, with transformers 5's module names: `vit.layers.{l}.attention.q_proj`, `mlp.fc1`, ...
    Vit,
}

/// A linear layer of the model: layer index + projection (+ the architecture's naming).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Site {
    pub layer: usize,
    pub proj: Proj,
    pub family: Family,
}

impl Site {
    /// A Llama-family site.
    pub fn llama(layer: usize, proj: Proj) -> Self {
        Site { layer, proj, family: Family::Llama }
    }

    /// Full module name as in transformers' `named_modules()` (e.g. `model.layers.0.self_attn.q_proj`,
    /// `bert.encoder.layer.0.attention.self.query`).
    pub fn module_name(&self) -> String {
        match self.family {
            Family::Llama => format!("model.layers.{}.{}", self.layer, self.proj.module_path()),
            Family::Bert { prefix } => {
                let m = match self.proj {
                    Proj::Q => "attention.self.query",
                    Proj::K => "attention.self.key",
                    Proj::V => "attention.self.value",
                    Proj::O => "attention.output.dense",
                    Proj::Up | Proj::Gate | Proj::Qkv => "intermediate.dense",
                    Proj::Down => "output.dense",
                };
                format!("{prefix}encoder.layer.{}.{m}", self.layer)
            }
            Family::Gpt2 => {
                let m = match self.proj {
                    Proj::Qkv | Proj::Q | Proj::K | Proj::V => "attn.c_attn",
                    Proj::O => "attn.c_proj",
                    Proj::Up | Proj::Gate => "mlp.c_fc",
                    Proj::Down => "mlp.c_proj",
                };
                format!("transformer.h.{}.{m}", self.layer)
            }
            Family::Vit => {
                let m = match self.proj {
                    Proj::Q => "attention.q_proj",
                    Proj::K => "attention.k_proj",
                    Proj::V | Proj::Qkv => "attention.v_proj",
                    Proj::O => "attention.o_proj",
                    Proj::Up | Proj::Gate => "mlp.fc1",
                    Proj::Down => "mlp.fc2",
                };
                format!("vit.layers.{}.{m}", self.layer)
            }
        }
    }
}

/// The normalisation layers of a model. A decoder (and ViT) has `Input` and `PostAttention`
/// in each layer and a `Final` one; BERT has `Embedding`, then `PostAttention` (after the
/// attention's residual) and `Output` (after the MLP's) in each layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Norm {
    Input(usize),
    PostAttention(usize),
    Final,
    Embedding,
    Output(usize),
}

impl Norm {
    /// The module name in a Llama-family decoder.
    pub fn module_name(&self) -> String {
        self.module_name_in(Family::Llama)
    }

    /// The module name in a model of `family` (a norm the family does not have is named as
    /// its nearest one: models only list the norms they have).
    pub fn module_name_in(&self, family: Family) -> String {
        match (family, *self) {
            (Family::Bert { prefix }, Norm::Embedding | Norm::Final) => format!("{prefix}embeddings.LayerNorm"),
            (Family::Bert { prefix }, Norm::PostAttention(l) | Norm::Input(l)) => format!("{prefix}encoder.layer.{l}.attention.output.LayerNorm"),
            (Family::Bert { prefix }, Norm::Output(l)) => format!("{prefix}encoder.layer.{l}.output.LayerNorm"),
            (Family::Vit, Norm::Input(l)) => format!("vit.layers.{l}.layernorm_before"),
            (Family::Vit, Norm::PostAttention(l) | Norm::Output(l)) => format!("vit.layers.{l}.layernorm_after"),
            (Family::Vit, Norm::Final | Norm::Embedding) => "vit.layernorm".to_string(),
            (Family::Gpt2, Norm::Input(l)) => format!("transformer.h.{l}.ln_1"),
            (Family::Gpt2, Norm::PostAttention(l) | Norm::Output(l)) => format!("transformer.h.{l}.ln_2"),
            (Family::Gpt2, Norm::Final | Norm::Embedding) => "transformer.ln_f".to_string(),
            (Family::Llama, Norm::Input(l)) => format!("model.layers.{l}.input_layernorm"),
            (Family::Llama, Norm::PostAttention(l) | Norm::Output(l)) => format!("model.layers.{l}.post_attention_layernorm"),
            (Family::Llama, Norm::Final | Norm::Embedding) => "model.norm".to_string(),
        }
    }
}

/// A base vector outside the linear layers that selective tuning (BitFit) may replace with a
/// trainable copy (see [`Adapter::tunable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tunable {
    /// An encoder's LayerNorm weight, or its bias.
    NormWeight(Norm),
    NormBias(Norm),
    /// ViT's patch embedding bias (`vit.embeddings.patch_embeddings.projection.bias`).
    PatchBias,
    /// BERT's pooler bias (`bert.pooler.dense.bias`).
    PoolerBias,
}

/// The two residual branches of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sublayer {
    Attention,
    Mlp,
}

/// How a PEFT method modifies a frozen model. The model calls these at fixed points; every
/// method has a default that changes nothing, so a method implements only what it touches.
pub trait Adapter {
    /// Before linear layer `site` (IA3 on feed-forward layers scales the input here).
    fn linear_input(&self, _site: Site, x: Tensor<2>) -> Tensor<2> {
        x
    }
    /// After linear layer `site`: `x` is its input [N, in], `y` the frozen output [N, out].
    fn linear_output(&self, _site: Site, _x: &Tensor<2>, y: Tensor<2>) -> Tensor<2> {
        y
    }
    /// Virtual token embeddings [n, hidden] put before every sequence (prompt tuning).
    fn prefix(&self) -> Option<Tensor<2>> {
        None
    }
    /// How many virtual tokens [`prefix`](Adapter::prefix) puts before every sequence.
    fn virtual_tokens(&self) -> usize {
        self.prefix().map_or(0, |p| p.dims()[0])
    }
    /// Keys and values [1, kv_heads, n, head_dim] per layer put before the real ones
    /// (prefix tuning): they act as a pre-filled KV cache.
    fn prefix_kv(&self) -> Option<Vec<(Tensor<4>, Tensor<4>)>> {
        None
    }
    /// A replacement weight [1, hidden] for a normalisation layer (LN tuning).
    fn norm_weight(&self, _norm: Norm) -> Option<Tensor<2>> {
        None
    }
    /// A trainable replacement [1, n] for a base vector outside the linear layers: an
    /// encoder's LayerNorm weight or bias, ViT's patch-embedding bias, BERT's pooler bias
    /// (selective tuning, BitFit).
    fn tunable(&self, _t: Tunable) -> Option<Tensor<2>> {
        None
    }
    /// The output of a residual branch before it is added back: `normed` is the branch's
    /// (normalised) input, `out` its output (bottleneck adapters).
    fn sublayer_output(&self, _layer: usize, _which: Sublayer, _normed: &Tensor<2>, out: Tensor<2>) -> Tensor<2> {
        out
    }
    /// The token embeddings [N, hidden] of `ids` [N] (LoRA on the embedding adds a term).
    fn embed_output(&self, _ids: &Tensor<1, Int>, x: Tensor<2>) -> Tensor<2> {
        x
    }
    /// Trainable replacements of frozen tensors (selective tuning, full fine-tuning):
    /// a linear layer's weight [in, out] and bias [1, out], the token embeddings
    /// [vocab, hidden], the LM head [hidden, vocab].
    fn linear_weight(&self, _site: Site) -> Option<Tensor<2>> {
        None
    }
    fn linear_bias(&self, _site: Site) -> Option<Tensor<2>> {
        None
    }
    fn embedding(&self) -> Option<Tensor<2>> {
        None
    }
    fn lm_head(&self) -> Option<Tensor<2>> {
        None
    }
}

/// No adapter: the frozen model.
pub struct NoHook;

impl Adapter for NoHook {}

/// Several adapters applied together (e.g. LoRA + IA3), in order.
pub struct Stack<'a>(pub Vec<&'a dyn Adapter>);

impl Adapter for Stack<'_> {
    fn linear_input(&self, site: Site, x: Tensor<2>) -> Tensor<2> {
        self.0.iter().fold(x, |x, a| a.linear_input(site, x))
    }
    fn linear_output(&self, site: Site, x: &Tensor<2>, y: Tensor<2>) -> Tensor<2> {
        self.0.iter().fold(y, |y, a| a.linear_output(site, x, y))
    }
    fn prefix(&self) -> Option<Tensor<2>> {
        let parts: Vec<Tensor<2>> = self.0.iter().filter_map(|a| a.prefix()).collect();
        (!parts.is_empty()).then(|| Tensor::cat(parts, 0))
    }
    fn norm_weight(&self, norm: Norm) -> Option<Tensor<2>> {
        self.0.iter().find_map(|a| a.norm_weight(norm))
    }
    fn tunable(&self, t: Tunable) -> Option<Tensor<2>> {
        self.0.iter().find_map(|a| a.tunable(t))
    }
    fn sublayer_output(&self, layer: usize, which: Sublayer, normed: &Tensor<2>, out: Tensor<2>) -> Tensor<2> {
        self.0.iter().fold(out, |o, a| a.sublayer_output(layer, which, normed, o))
    }
    fn embed_output(&self, ids: &Tensor<1, Int>, x: Tensor<2>) -> Tensor<2> {
        self.0.iter().fold(x, |x, a| a.embed_output(ids, x))
    }
    fn linear_weight(&self, site: Site) -> Option<Tensor<2>> {
        self.0.iter().find_map(|a| a.linear_weight(site))
    }
    fn linear_bias(&self, site: Site) -> Option<Tensor<2>> {
        self.0.iter().find_map(|a| a.linear_bias(site))
    }
    fn embedding(&self) -> Option<Tensor<2>> {
        self.0.iter().find_map(|a| a.embedding())
    }
    fn lm_head(&self) -> Option<Tensor<2>> {
        self.0.iter().find_map(|a| a.lm_head())
    }
    fn prefix_kv(&self) -> Option<Vec<(Tensor<4>, Tensor<4>)>> {
        let all: Vec<_> = self.0.iter().filter_map(|a| a.prefix_kv()).collect();
        let mut it = all.into_iter();
        let first = it.next()?;
        Some(it.fold(first, |acc, more| acc.into_iter().zip(more).map(|((k1, v1), (k2, v2))| (Tensor::cat(vec![k1, k2], 2), Tensor::cat(vec![v1, v2], 2))).collect()))
    }
}

/// Different adapters for different rows of one batch (peft's `adapter_names=`): row `b`
/// gets adapter `rows[b]` (or none). Each adapter's change is masked to its own rows, so
/// one forward pass serves every row. Only methods that change values in place (LoRA, IA3,
/// bottleneck adapters, embedding LoRA) can be mixed; the caller checks that.
pub struct PerRow<'a> {
    /// (adapter, mask [batch * seq, 1] with 1 on its rows)
    parts: Vec<(&'a dyn Adapter, Tensor<2>)>,
}

/// For each of `n` adapters, the mask [rows * seq, 1] of the rows routed to it (None when no
/// row is), given `rows[b]` = the adapter of row `b` (None: the frozen model).
pub fn row_masks(n: usize, rows: &[Option<usize>], seq: usize, device: &burn::tensor::Device) -> Vec<Option<Tensor<2>>> {
    (0..n)
        .map(|k| {
            rows.contains(&Some(k)).then(|| {
                let mask: Vec<f32> = rows.iter().flat_map(|r| std::iter::repeat_n(if *r == Some(k) { 1.0 } else { 0.0 }, seq)).collect();
                crate::tensor::floats(mask, [rows.len() * seq, 1], device)
            })
        })
        .collect()
}

impl<'a> PerRow<'a> {
    /// `rows[b]` indexes `adapters` (None: the frozen model) for a batch of `rows.len()`
    /// sequences of `seq` tokens.
    pub fn new(adapters: Vec<&'a dyn Adapter>, rows: &[Option<usize>], seq: usize, device: &burn::tensor::Device) -> Self {
        let masks = row_masks(adapters.len(), rows, seq, device);
        PerRow { parts: adapters.into_iter().zip(masks).filter_map(|(a, m)| m.map(|m| (a, m))).collect() }
    }

    /// From adapters with their row masks.
    pub fn from_masks(parts: Vec<(&'a dyn Adapter, Tensor<2>)>) -> Self {
        PerRow { parts }
    }

    /// `base` where no adapter applies, each adapter's `f(base)` on its rows.
    fn mix(&self, base: Tensor<2>, f: impl Fn(&dyn Adapter, Tensor<2>) -> Tensor<2>) -> Tensor<2> {
        self.parts.iter().fold(base.clone(), |acc, (a, m)| acc + (f(*a, base.clone()) - base.clone()) * m.clone())
    }
}

impl Adapter for PerRow<'_> {
    fn linear_input(&self, site: Site, x: Tensor<2>) -> Tensor<2> {
        self.mix(x, |a, x| a.linear_input(site, x))
    }
    fn linear_output(&self, site: Site, x: &Tensor<2>, y: Tensor<2>) -> Tensor<2> {
        self.mix(y, |a, y| a.linear_output(site, x, y))
    }
    fn sublayer_output(&self, layer: usize, which: Sublayer, normed: &Tensor<2>, out: Tensor<2>) -> Tensor<2> {
        self.mix(out, |a, o| a.sublayer_output(layer, which, normed, o))
    }
    fn embed_output(&self, ids: &Tensor<1, Int>, x: Tensor<2>) -> Tensor<2> {
        self.mix(x, |a, x| a.embed_output(ids, x))
    }
}
