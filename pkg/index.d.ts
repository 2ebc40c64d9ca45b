/** Error thrown by every webpeft call. */
export interface WebpeftError extends Error {
  /** "io" | "parse" | "format" | "shape" | "unsupported" | "config" | "device" | "data" | "numeric" | "panic" | "timeout" | "aborted" */
  code: string;
  /** "AbortError" when a signal cancelled the call. */
  name: string;
  /** HTTP status of a failed download. */
  status?: number;
}

export interface InitOptions {
  /** Where to fetch webpeft_bg.wasm from (default: next to the package's JS). */
  wasmUrl?: string | URL;
  timeoutMs?: number;
}

/** Loads the wasm module, acquires WebGPU and checks the device computes correctly. */
export function init(options?: InitOptions): Promise<{ device: string }>;

/** Download progress of one file; `cached`: read from the browser's cache (no network). */
export interface Progress { file: string; loaded: number; total: number; cached: boolean }

export interface LoadOptions {
  onProgress?: (p: Progress) => void;
  /** Cancel the download (the promise rejects with an AbortError). */
  signal?: AbortSignal;
  /** Keep downloaded files in Cache Storage, checked by size and SHA-256 when read back (default true). */
  cache?: boolean;
  timeoutMs?: number;
  /**
   * How the frozen weights are held on the GPU (decoders): 'keep' (a GGUF's Q8_0 / Q4_0 /
   * Q4_1 stay quantized and are dequantized inside the matmul kernels), 'f32', 'f16' (every
   * matrix in f16, matmuls with f32 accumulation, the loss scaled in training; needs the
   * adapter's shader-f16, else the load is refused), 'keep-f16' (blocks kept, the rest f16),
   * or 'q8_0' | 'q4_0' | 'q4_1' | 'nf4' (quantized at load, e.g. a safetensors model).
   * Default: 'keep-f16' where the adapter offers shader-f16, else 'keep'.
   */
  base?: 'keep' | 'f32' | 'f16' | 'keep-f16' | 'q8_0' | 'q4_0' | 'q4_1' | 'nf4';
  /**
   * How decoders compute attention: 'blocked' (default: query blocks through the matmul
   * kernels with their own backward; memory linear in the sequence length), 'reference'
   * (tensor ops with a T × S score matrix per head) or 'fused' (flash-attention-style kernels).
   */
  attention?: 'blocked' | 'reference' | 'fused';
}

/** Remove every cached model file; resolves to whether there was a cache. */
export function clearCache(): Promise<boolean>;

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

export interface ChatMessage { role: 'system' | 'user' | 'assistant' | string; content: string }

/**
 * A training example: plain text (every token trained), a prompt and its completion (only the
 * completion trained), or a conversation rendered with the model's chat template (only the
 * assistant turns trained).
 */
export type Example = string | { text: string } | { prompt: string; completion: string } | { messages: ChatMessage[] };

/** Parse a data file (text; JSONL with `text`, `prompt`/`completion` or chat `messages`; CSV with `text` or `prompt`,`completion` columns; by the extension of `name`). */
export function parseData(name: string, text: string): Promise<Example[]>;

/** Parse labelled rows for a classifier: CSV/TSV with `text` and `label` columns, or JSONL `{"text", "label"}`. */
export function parseLabeled(name: string, text: string): Promise<{ text: string; label: string }[]>;

/** One matmul's measured rate (`[n, n] · [n, n]`). */
/** `f32`: Burn's f32 matmul; `f32-ours`: webpeft's f32 kernel; `f16`: Burn's f16 matmul; `q4_1`: the dequantizing kernel. */
export interface MatmulRate { kernel: 'f32' | 'f32-ours' | 'f16' | 'q4_1'; n: number; seconds: number; tflops: number }

/**
 * The device's measured peak: the best TFLOP/s of the matmuls training uses (Burn's f32, our f32
 * kernel, f16 where the device has shader-f16, the Q4_1 dequantizing kernel), `reps` products per kernel and size.
 */
export function measurePeak(options?: { sizes?: number[]; reps?: number }): Promise<{ tflops: number; kernel: string; n: number; rates: MatmulRate[] }>;

/**
 * Which matmul runs the f32 products on the GPU (attention, LoRA, an f32 base): 'ours' (webpeft's
 * kernel, the default in the browser) or 'burn' (Burn's). Rejects (code "config") on another name.
 */
export function setMatmul(kind: 'ours' | 'burn'): Promise<void>;

/** One kernel (by name) of a profile. */
export interface KernelTime {
  kernel: string;
  launches: number;
  /** Device time summed over its launches. */
  seconds: number;
  /** Its part of all kernels' time. */
  share: number;
}

/** Every GPU kernel launched between `startProfile()` and `finishProfile()`, by kernel. */
export interface KernelProfile {
  /** "device": timestamps the GPU wrote (WebGPU `timestamp-query`); "host": the host clock around each submit. */
  timing: 'device' | 'host';
  launches: number;
  timed: number;
  kernel_seconds: number;
  /** First kernel start to last kernel end (device timing only). */
  span_seconds: number | null;
  /** Time in that span with no kernel running (device timing only). */
  idle_seconds: number | null;
  wall_seconds: number;
  /** Most time first. */
  kernels: KernelTime[];
  /** The same time by phase of the work (training: "forward", "backward", "update"; "" outside any), in order of first launch. */
  phases: { phase: string; launches: number; seconds: number; share: number }[];
}

/**
 * Start timing every GPU kernel this module launches on this thread's device (a session in a
 * worker runs its own module: profile there). A second call starts over.
 */
export function startProfile(): void;

/** Stop the profile, wait for its kernels and resolve to them by kernel; rejects (code "config") when none was started. */
export function finishProfile(): Promise<KernelProfile>;

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
  /** Differentially private training (DP-SGD); `maxGradNorm` above then does not apply. */
  dp?: DpOptions;
  /** Step reports carry `checkpoint` (the run's state as files) every this many steps and after the last. */
  checkpointEvery?: number;
  /** The most memory a training step may use (MiB): larger batches run as micro-batches (the same update) to stay within it; what cannot fit is refused naming the setting. */
  memoryBudgetMiB?: number;
  /** Continue the run a checkpoint came from (same examples and options): ends exactly where the uninterrupted run ends. */
  resume?: Record<string, Uint8Array>;
  /** Hold out this share of the examples (seeded by `seed`) as a validation set. */
  validation?: number;
  /** Or the validation examples themselves. */
  validationData?: Example[];
  /** Evaluate every this many steps (default: after the last step only). */
  evalEvery?: number;
  /** Gradient checkpointing: recompute each block's activations in the backward pass instead of keeping them (far less memory, one more forward pass per step). Unset: turned on when the memory plan needs it to keep the batch whole. */
  gradientCheckpointing?: boolean;
  timeoutMs?: number;
}

export interface DpOptions {
  /** σ: Gaussian noise of std σ·maxGradNorm is added to the sum of clipped per-example gradients. */
  noiseMultiplier?: number;
  /** Per-example gradient norm bound C (default 1). */
  maxGradNorm?: number;
  /** δ of the reported (ε, δ) (default 1e-5). */
  delta?: number;
  /** Stop before ε would exceed this budget; without noiseMultiplier, the smallest σ that keeps ε within it for the run. */
  targetEpsilon?: number;
  /** 'poisson' (default: what the accountant assumes) or 'shuffle' (fixed-size batches). */
  sampling?: 'poisson' | 'shuffle';
}

/** The loss on the validation set after a step. */
export interface EvalReport { loss: number; targets: number }

/** What a run would take before it starts (`estimate`); sizes in bytes. */
export interface RunEstimate {
  trainable: number;
  /**
   * One optimizer step's floating-point operations (matrix products: the forward pass, the
   * frozen base's input gradients, the adapter's own products; the crate's `train::flops`).
   */
  stepFlops: number;
  /** The micro-batch and accumulation that fit the device (what training will use). */
  batch: number;
  gradAccum: number;
  memory: { total: number; weights: number; adapter: number; activations: number; attention: number; logits: number; largestBuffer: number; largestBufferName: string };
  /** With `probe`: one training step over one row, measured on this device (s). */
  rowSeconds?: number;
  /** With `probe`: a step put at that per row of the batch (s), and the whole run. */
  stepSeconds?: number;
  totalSeconds?: number;
}

/** What training sees of one example: token ids, each token's text, whether the loss counts it. */
export interface PreviewRow { ids: number[]; pieces: string[]; trained: boolean[] }

export interface PreviewOptions { seqLen?: number; appendEos?: boolean; limit?: number }

/** Adapter files, one .zip of them, or (for `loadAdapter`) a URL of a PEFT folder or .zip. */
export type AdapterSource = PeftFiles | Record<string, Uint8Array | ArrayBuffer | Blob | string> | File[] | FileList | string;

export interface StepReport {
  /** The validation loss after this step (with `validation` / `validationData`, every `evalEvery` steps and after the last). */
  eval?: EvalReport;
  step: number;
  /** The steps of the whole run. */
  totalSteps: number;
  /** Session API: the time left at the mean step time so far (s). */
  etaSeconds?: number;
  /** The run stopped here on a pause (`requestPause`); `checkpoint` resumes it. */
  paused?: boolean;
  loss: number;
  lr: number;
  gradNorm: number;
  tokens: number;
  tokensPerSecond: number;
  seconds: number;
  epoch: number;
  skipped: boolean;
  memoryInUse?: number;
  /** Multi-task training (`trainTasks`): each task's mean loss in this step (NaN if it had no row). */
  taskLosses?: Record<string, number>;
  /** DP-SGD: ε spent so far (RDP accountant) for `dp.delta`. */
  epsilon?: number;
  /** With `checkpointEvery`: the run's state after this step (`state.json`, `tensors.safetensors`), to store and pass back as `resume`. */
  checkpoint?: Record<string, Uint8Array>;
}

export interface GenerateOptions {
  /** An adapter, or several applied together. */
  adapter?: string | string[];
  maxNewTokens?: number;
  /** 0 = greedy. */
  temperature?: number;
  topP?: number;
  seed?: number;
  /** Wrap the prompt in the model's chat template. */
  chat?: boolean;
  /**
   * Each generated token with the text it adds ('' while a character is incomplete); the
   * pieces add up to the result. A last call with id null flushes text still held back.
   */
  onToken?: (id: number | null, text: string) => boolean | void;
  timeoutMs?: number;
}

export interface PeftFiles {
  'adapter_config.json': string;
  'adapter_model.safetensors': Uint8Array;
}

export type Combination =
  | 'svd' | 'linear' | 'cat' | 'ties' | 'ties_svd' | 'dare_linear' | 'dare_linear_svd'
  | 'dare_ties' | 'dare_ties_svd' | 'magnitude_prune' | 'magnitude_prune_svd';

export interface CombineOptions {
  /** Default 'svd'. */
  combinationType?: Combination;
  /** Rank of the result for the svd types (default: the largest input rank). */
  svdRank?: number;
  /** Quantile at which the SVD factors are clamped. */
  svdClamp?: number;
  /** Fraction kept by ties / dare / magnitude_prune. */
  density?: number;
  majoritySignMethod?: 'total' | 'frequency';
  /** Seed of DARE's random pruning. */
  seed?: number;
}

export interface Logits {
  shape: number[];
  data: Float32Array;
}

export class Model {
  static load(source: ModelSource, options?: LoadOptions): Promise<Model>;
  /** `base`: the linear layers' storage ('f32', 'q4_1', ...); `baseBytes`: what the frozen base holds on the device. */
  info(): { modelType: string; vocabSize: number; hiddenSize: number; layers: number; parameters: number; device: string; base: string; baseBytes: number; attention: 'blocked' | 'reference' | 'fused' };
  tokenize(text: string): number[];
  addAdapter(name: string, config: LoraConfig | string, options?: { seed?: number }): Promise<void>;
  loadAdapter(name: string, source: AdapterSource, options?: LoadOptions): Promise<void>;
  saveAdapter(name: string): Promise<PeftFiles>;
  /** The adapter as one zip: a folder `name/` with both PEFT files. */
  saveAdapterZip(name: string): Promise<Uint8Array>;
  estimate(config: Record<string, unknown> | string, options?: TrainOptions, controls?: { probe?: boolean }): Promise<RunEstimate>;
  preview(examples: Example[], options?: PreviewOptions): PreviewRow[];
  train(examples: Example[], options?: TrainOptions, onStep?: (r: StepReport) => boolean | void): Promise<StepReport[]>;
  trainTasks(tasks: Record<string, Example[]>, options?: Omit<TrainOptions, 'adapter'>, onStep?: (r: StepReport) => boolean | void): Promise<StepReport[]>;
  /** Stop the running training call after its current step, with a checkpoint in that step's report (`paused: true`). Returns whether a call was running. */
  requestPause(): boolean;
  generate(prompt: string, options?: GenerateOptions): Promise<string>;
  logits(ids: ArrayLike<number>, adapter?: string | string[]): Promise<Logits>;
  logitsPerRow(rows: ArrayLike<number>[], adapters: (string | null)[]): Promise<Logits>;
  adapters(): { name: string; method: string }[];
  deleteAdapter(name: string): Promise<void>;
  addWeightedAdapter(name: string, adapters: string[], weights: number[], options?: CombineOptions): Promise<void>;
  mergeAdapter(name: string): Promise<void>;
  unmergeAdapter(name: string): Promise<void>;
  exportModel(): Promise<Record<string, string | Uint8Array>>;
}

export interface ClassifierMetrics {
  loss: number;
  accuracy: number;
  macroF1: number;
  /** Expected calibration error (15 bins). */
  ece: number;
  /** confusion[true][predicted] */
  confusion: number[][];
}

export interface EpochReport {
  epoch: number;
  steps: number;
  trainLoss: number;
  val: ClassifierMetrics | null;
  seconds: number;
  tokensPerSecond: number;
}

export interface TaskTrainOptions {
  epochs?: number;
  maxSteps?: number;
  batch?: number;
  seqLen?: number;
  lr?: number;
  weightDecay?: number;
  warmup?: number;
  schedule?: 'constant' | 'linear' | 'cosine';
  maxGradNorm?: number;
  seed?: number;
  /** Share of each class held out for validation (default 0.1). */
  valSplit?: number;
  /** Balanced class weights for imbalanced labels. */
  classWeights?: boolean;
  /** Early stopping: epochs without a better validation loss. */
  patience?: number;
  /** Fit a temperature on the validation split (default true). */
  calibrate?: boolean;
  timeoutMs?: number;
}

export interface ClassifierReport {
  labels: string[];
  epochs: EpochReport[];
  bestEpoch: number;
  temperature: number;
  val: ClassifierMetrics | null;
  valCalibrated: ClassifierMetrics | null;
  trainExamples: number;
  valExamples: number;
}

export interface Prediction {
  label: string;
  id: number;
  probabilities: number[];
  logits: Float32Array;
}

export class TaskModel {
  static load(source: ModelSource, options?: LoadOptions & { task?: 'classification' | 'embedding' }): Promise<TaskModel>;
  info(): { architecture: string; hiddenSize: number; labels: string[]; temperature: number; device: string };
  addLora(config: LoraConfig | string, options?: { seed?: number }): Promise<void>;
  /** BitFit: every bias of the model (linear layers, LayerNorms, ViT's patch embedding, BERT's pooler) trains with the head; resolves to the number of trainable values. */
  addBitFit(): Promise<number>;
  loadAdapter(files: Record<string, Uint8Array | ArrayBuffer | Blob | string>): Promise<void>;
  saveAdapter(): Promise<Record<string, string | Uint8Array>>;
  trainClassifier(rows: { text: string; label: string | number }[], options?: TaskTrainOptions, onEpoch?: (r: EpochReport) => boolean | void): Promise<ClassifierReport>;
  trainImageClassifier(rows: { image: Blob | ArrayBuffer | Uint8Array; label: string | number }[], options?: TaskTrainOptions, onEpoch?: (r: EpochReport) => boolean | void): Promise<ClassifierReport>;
  predictImages(images: (Blob | ArrayBuffer | Uint8Array)[], options?: { batch?: number; timeoutMs?: number }): Promise<Prediction[]>;
  predict(texts: string[], options?: { seqLen?: number; batch?: number; timeoutMs?: number }): Promise<Prediction[]>;
  embed(texts: string[], options?: { seqLen?: number; batch?: number; timeoutMs?: number }): Promise<Float32Array[]>;
  trainEmbeddings(pairs: { anchor: string; positive: string }[], options?: TaskTrainOptions, onStep?: (r: { step: number; loss: number; lr: number }) => boolean | void): Promise<number[]>;
}

// ---- The session API: the same calls, run in a dedicated Web Worker (the page never blocks).
// Buffers passed in are transferred to the worker (detached in the caller); results come back
// the same way.

export interface SessionOptions {
  /**
   * A Worker running `webpeft/worker` (for bundlers that build workers themselves), or a
   * function that makes one: with a function the session can replace a worker whose GPU device
   * was lost. Default: the package's worker.js.
   */
  worker?: Worker | (() => Worker);
  wasmUrl?: string | URL;
  timeoutMs?: number;
}

/** Start a session: a dedicated worker with the wasm module and the WebGPU device. */
export function createSession(options?: SessionOptions): Promise<Session>;

export interface RunControls {
  onStep?: (r: StepReport) => void;
  /** Each validation result (with `validation` / `validationData` in the options). */
  onEval?: (e: EvalReport & { step: number }) => void;
  /** Each checkpoint (every `checkpointEvery` steps, and at a pause): store it to resume later. */
  onCheckpoint?: (c: { step: number; files: Record<string, Uint8Array> }) => void;
  /** Problems that do not stop the run (e.g. a checkpoint that could not be kept in OPFS); default console.warn. */
  onWarning?: (message: string) => void;
  /** Cancel at the next step boundary: the promise rejects with an AbortError; what was trained stays in the adapter. */
  signal?: AbortSignal;
}

export interface TrainControls extends RunControls {
  /** A run id: the run and its checkpoints (every `checkpointEvery` steps, default 10, at a pause and at the end) are kept in the origin-private file system, to resume after a reload or crash. */
  persist?: string;
}

export interface SavedRun {
  id: string;
  step: number;
  totalSteps: number;
  /** The run ended (its last checkpoint is kept). */
  done: boolean;
  savedAt: number;
  adapter: string[];
  /** The model's URL, when it was loaded from one. */
  model: string | null;
}

/** A training call in progress: a promise of its step reports that can pause and resume. */
export class TrainRun implements PromiseLike<StepReport[]> {
  readonly state: 'running' | 'pausing' | 'paused' | 'done' | 'failed';
  /** The last checkpoint's files, or null. */
  readonly checkpoint: Record<string, Uint8Array> | null;
  /** Stop after the current step, keeping the run's state; resolves to that step (null if the run ended first). */
  pause(): Promise<number | null>;
  /** Continue a paused run; the result is the uninterrupted run's, to the byte. False if not paused. */
  resume(): boolean;
  then<A = StepReport[], B = never>(onfulfilled?: ((v: StepReport[]) => A | PromiseLike<A>) | null, onrejected?: ((e: WebpeftError) => B | PromiseLike<B>) | null): Promise<A | B>;
  catch<B = never>(onrejected?: ((e: WebpeftError) => B | PromiseLike<B>) | null): Promise<StepReport[] | B>;
  finally(f?: (() => void) | null): Promise<StepReport[]>;
}

export class RemoteModel {
  info(): ReturnType<Model['info']>;
  tokenize(text: string): Promise<number[]>;
  addAdapter(name: string, config: LoraConfig | string, options?: { seed?: number }): Promise<void>;
  loadAdapter(name: string, source: AdapterSource, options?: Omit<LoadOptions, 'timeoutMs'>): Promise<void>;
  saveAdapter(name: string): Promise<PeftFiles>;
  saveAdapterZip(name: string): Promise<Uint8Array>;
  estimate(config: Record<string, unknown> | string, options?: TrainOptions, controls?: { probe?: boolean }): Promise<RunEstimate>;
  preview(examples: Example[], options?: PreviewOptions): Promise<PreviewRow[]>;
  adapters(): Promise<{ name: string; method: string }[]>;
  deleteAdapter(name: string): Promise<void>;
  logits(ids: ArrayLike<number>, adapter?: string | string[]): Promise<Logits>;
  logitsPerRow(rows: ArrayLike<number>[], adapters: (string | null)[]): Promise<Logits>;
  addWeightedAdapter(name: string, adapters: string[], weights: number[], options?: CombineOptions): Promise<void>;
  mergeAdapter(name: string): Promise<void>;
  unmergeAdapter(name: string): Promise<void>;
  exportModel(): Promise<Record<string, string | Uint8Array>>;
  generate(prompt: string, options?: Omit<GenerateOptions, 'onToken'> & { onToken?: (id: number | null, text: string) => void; signal?: AbortSignal }): Promise<string>;
  train(examples: Example[], options?: TrainOptions, controls?: TrainControls): TrainRun;
  trainTasks(tasks: Record<string, Example[]>, options?: Omit<TrainOptions, 'adapter'>, controls?: TrainControls): TrainRun;
  /** Continue a kept run from its last checkpoint (its adapters are re-created if missing). */
  resumeRun(id: string, controls?: RunControls): TrainRun;
  dispose(): Promise<boolean>;
}

export class RemoteTaskModel {
  info(): ReturnType<TaskModel['info']>;
  addLora(config: LoraConfig | string, options?: { seed?: number }): Promise<void>;
  addBitFit(): Promise<number>;
  loadAdapter(files: Record<string, Uint8Array | ArrayBuffer | Blob | string>): Promise<void>;
  saveAdapter(): Promise<Record<string, string | Uint8Array>>;
  predict(texts: string[], options?: { seqLen?: number; batch?: number; timeoutMs?: number }): Promise<Prediction[]>;
  predictImages(images: (Blob | ArrayBuffer | Uint8Array)[], options?: { batch?: number; timeoutMs?: number }): Promise<Prediction[]>;
  embed(texts: string[], options?: { seqLen?: number; batch?: number; timeoutMs?: number }): Promise<Float32Array[]>;
  trainClassifier(rows: { text: string; label: string | number }[], options?: TaskTrainOptions, controls?: { onEpoch?: (r: EpochReport) => void; signal?: AbortSignal }): Promise<ClassifierReport>;
  trainImageClassifier(rows: { image: Blob | ArrayBuffer | Uint8Array; label: string | number }[], options?: TaskTrainOptions, controls?: { onEpoch?: (r: EpochReport) => void; signal?: AbortSignal }): Promise<ClassifierReport>;
  trainEmbeddings(pairs: { anchor: string; positive: string }[], options?: TaskTrainOptions, controls?: { onStep?: (r: { step: number; loss: number; lr: number }) => void; signal?: AbortSignal }): Promise<number[]>;
  dispose(): Promise<boolean>;
}

export class Session {
  /** The self-check's result for the worker's GPU device. */
  readonly device: { device: string };
  loadModel(source: ModelSource, options?: LoadOptions): Promise<RemoteModel>;
  loadTaskModel(source: ModelSource, options?: LoadOptions & { task?: 'classification' | 'embedding' }): Promise<RemoteTaskModel>;
  parseData(name: string, text: string): Promise<Example[]>;
  parseLabeled(name: string, text: string): Promise<{ text: string; label: string }[]>;
  savedRuns(): Promise<SavedRun[]>;
  deleteRun(id: string): Promise<boolean>;
  clearCache(): Promise<boolean>;
  /** Stop the worker (its models and GPU memory are freed); pending calls reject with code "panic". */
  terminate(): void;
  /**
   * Testing aid: lose the worker's GPU device (`device.destroy()`, as a driver reset would), now
   * or when a training run reports step `atStep`. The session recovers as from a real loss: a
   * new worker and device, models loaded from URLs reloaded (from the cache), training runs kept
   * with `persist` resumed from their last checkpoint under the same promise (`onWarning` says
   * so); other calls in flight reject with code "device". With `again: n`, the devices of the
   * next n workers that take over are lost too as soon as they are acquired (a recovery that
   * loses its device starts over, three tries in all).
   */
  simulateDeviceLoss(options?: { atStep?: number; again?: number }): Promise<boolean>;
}
