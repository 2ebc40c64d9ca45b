//! An IA3 adapter over a model and its PEFT files (`<module>.ia3_l`: [out, 1], or [1, in]
//! on feed-forward modules).

use std::collections::{BTreeMap, HashSet};

use burn::tensor::Tensor;

use crate::error::{Result, bail, err};
use crate::io::safetensors::{HostTensor, OutTensor};
use crate::models::hooks::{Adapter, Site};
use crate::models::llama::Llama;
use crate::peft::ia3::Ia3Config;
use crate::peft::targets::Matcher;
use crate::peft::{Layout, NamedParam};
use crate::tensor::{read, upload};

/// One scaling vector, stored [1, d] so it broadcasts over rows.
pub struct Ia3Layer {
    pub l: Tensor<2>,
    pub feedforward: bool,
}

pub struct Ia3Adapter {
    pub config: Ia3Config,
    pub layers: BTreeMap<Site, Ia3Layer>,
}

fn key(site: Site) -> String {
    format!("base_model.model.{}.ia3_l", site.module_name())
}

impl Ia3Adapter {
    /// Targeted sites with their feed-forward flag and vector length.
    fn sites(config: &Ia3Config, model: &Llama) -> Result<Vec<(Site, bool, usize)>> {
        let m = Matcher::new(config.target_modules.clone(), config.exclude_modules.clone(), None, None)?;
        let v: Vec<_> = model
            .sites()
            .into_iter()
            .filter(|s| m.matches(&s.module_name(), false))
            .map(|s| {
                let ff = config.is_feedforward(&s.module_name());
                let lin = model.linear(s);
                (s, ff, if ff { lin.in_features() } else { lin.out_features() })
            })
            .collect();
        if v.is_empty() {
            bail!(Config, "target_modules {:?} matches no linear layer of the model", config.target_modules);
        }
        Ok(v)
    }

    /// A new adapter: vectors of ones (peft's init_ia3_weights = true).
    pub fn new(config: Ia3Config, model: &Llama) -> Result<Self> {
        if !config.init_ia3_weights {
            bail!(Unsupported, "init_ia3_weights = false (random init) is not supported; use true");
        }
        let mut layers = BTreeMap::new();
        for (site, feedforward, d) in Self::sites(&config, model)? {
            layers.insert(site, Ia3Layer { l: upload(&HostTensor::new(vec![1, d], vec![1.0; d]), &model.device)?, feedforward });
        }
        Ok(Ia3Adapter { config, layers })
    }

    pub fn from_peft(config: Ia3Config, weights: &[u8], model: &Llama) -> Result<Self> {
        let tensors = crate::peft::read_weights(weights)?;
        let mut used = HashSet::new();
        let mut layers = BTreeMap::new();
        for (site, feedforward, d) in Self::sites(&config, model)? {
            let k = key(site);
            let t = tensors.get(&k).ok_or_else(|| err!(Format, "adapter_model.safetensors: missing {k}"))?;
            let want = if feedforward { vec![1, d] } else { vec![d, 1] };
            if t.shape != want {
                bail!(Shape, "adapter_model.safetensors: {k} has shape {:?}, expected {want:?}", t.shape);
            }
            layers.insert(site, Ia3Layer { l: upload(&HostTensor::new(vec![1, d], t.data.clone()), &model.device)?, feedforward });
            used.insert(k);
        }
        if let Some(extra) = tensors.keys().find(|k| !used.contains(*k)) {
            bail!(Format, "adapter_model.safetensors: tensor {extra} does not belong to any targeted module");
        }
        Ok(Ia3Adapter { config, layers })
    }

    pub async fn to_peft(&self) -> Result<(String, Vec<u8>)> {
        let mut out = BTreeMap::new();
        for (site, l) in &self.layers {
            let h = read(l.l.clone()).await?;
            let d = h.data.len();
            let shape = if l.feedforward { vec![1, d] } else { vec![d, 1] };
            out.insert(key(*site), OutTensor::F32(HostTensor::new(shape, h.data)));
        }
        crate::peft::peft_files(self.config.to_json(), &out)
    }

    pub fn params_mut(&mut self) -> Vec<NamedParam<'_>> {
        self.layers.iter_mut().map(|(s, l)| NamedParam::new(key(*s), &mut l.l, Layout::Row)).collect()
    }
}

impl Adapter for Ia3Adapter {
    fn linear_input(&self, site: Site, x: Tensor<2>) -> Tensor<2> {
        match self.layers.get(&site) {
            Some(l) if l.feedforward => x * l.l.clone(),
            _ => x,
        }
    }
    fn linear_output(&self, site: Site, _x: &Tensor<2>, y: Tensor<2>) -> Tensor<2> {
        match self.layers.get(&site) {
            Some(l) if !l.feedforward => y * l.l.clone(),
            _ => y,
        }
    }
}
