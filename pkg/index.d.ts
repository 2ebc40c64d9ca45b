/** Error thrown by every webpeft call. */
export interface WebpeftError extends Error {
  /** "io" | "parse" | "format" | "shape" | "unsupported" | "config" | "device" | "data" | "numeric" | "panic" | "timeout" */
  code: string;
}

export interface InitOptions {
  /** Where to fetch webpeft_bg.wasm from (default: next to the package's JS). */
  wasmUrl?: string | URL;
  timeoutMs?: number;
}

/** Loads the wasm module, acquires WebGPU and checks the device computes correctly. */
export function init(options?: InitOptions): Promise<{ device: string }>;

export interface Progress { file: string; loaded: number; total: number }

export type ModelSource =
  | string
  | Record<string, Uint8Array | ArrayBuffer | Blob | string>
  | File[]
  | FileList;

export interface LoraConfig {
  peft_type?: 'LORA';
  r?: number;
  lora_alpha?: number;
  lora_dropout?: number;
  /** List of module-name suffixes, a regex string, or "all-linear". */
  target_modules: string[] | string;
  exclude_modules?: string[] | string;
  use_rslora?: boolean;
  init_lora_weights?: boolean | 'gaussian';
  layers_to_transform?: number[] | number;
  layers_pattern?: string;
  rank_pattern?: Record<string, number>;
  alpha_pattern?: Record<string, number>;
  task_type?: string;
  [key: string]: unknown;
}

export type Example = string | { text: string } | { prompt: string; completion: string };

export interface TrainOptions {
  /** The adapter to train (default "default"), or several trained together (hybrid). */
  adapter?: string | string[];
  steps?: number;
  batch?: number;
  seqLen?: number;
  gradAccum?: number;
  lr?: number;
  warmup?: number;
  schedule?: 'constant' | 'linear' | 'cosine';
  weightDecay?: number;
  /** 0 disables clipping. Default 1. */
  maxGradNorm?: number;
  seed?: number;
  appendEos?: boolean;
  timeoutMs?: number;
}

export interface StepReport {
  step: number;
  loss: number;
  lr: number;
  gradNorm: number;
  tokens: number;
  tokensPerSecond: number;
  seconds: number;
  epoch: number;
  skipped: boolean;
  memoryInUse?: number;
}

export interface GenerateOptions {
  adapter?: string;
  maxNewTokens?: number;
  /** 0 = greedy. */
  temperature?: number;
  topP?: number;
  seed?: number;
  /** Wrap the prompt in the model's chat template. */
  chat?: boolean;
  onToken?: (id: number) => void;
  timeoutMs?: number;
}

export interface PeftFiles {
  'adapter_config.json': string;
  'adapter_model.safetensors': Uint8Array;
}

export class Model {
  static load(source: ModelSource, options?: { onProgress?: (p: Progress) => void; timeoutMs?: number }): Promise<Model>;
  info(): { modelType: string; vocabSize: number; hiddenSize: number; layers: number; parameters: number; device: string };
  tokenize(text: string): number[];
  addAdapter(name: string, config: LoraConfig | string, options?: { seed?: number }): Promise<void>;
  loadAdapter(name: string, files: PeftFiles | Record<string, Uint8Array | ArrayBuffer | Blob | string>): Promise<void>;
  saveAdapter(name: string): Promise<PeftFiles>;
  train(examples: Example[], options?: TrainOptions, onStep?: (r: StepReport) => boolean | void): Promise<StepReport[]>;
  generate(prompt: string, options?: GenerateOptions): Promise<string>;
  logits(ids: ArrayLike<number>, adapter?: string): Promise<{ shape: number[]; data: Float32Array }>;
}
