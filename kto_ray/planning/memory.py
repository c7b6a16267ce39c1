"""The planner's memory formulas: DeepSpeed's model-state estimates (generalised to fp32 and LoRA),
stored activations and the log-prob computation's logits, in bytes per GPU (or CPU worker)."""

from __future__ import annotations

import math

from kto_ray.planning.architecture import Architecture

GIB = 2**30
# CUDA context and kernels, NCCL buffers, ZeRO-3 prefetch/reduce buckets, allocator fragmentation:
# none of these is in DeepSpeed's estimate, all of them are real on a GPU.
OVERHEAD_GIB = 4.0
# A CPU worker's own footprint before any model state: the Python process with torch, DeepSpeed, Ray and
# transformers imported, gloo and the data reader (~0.65 GiB measured, BENCHMARKS.md "Worker memory").
CPU_BASELINE_GIB = 0.65
BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor for CPU memory
# ZeRO-3's optimizer sub-group (DeepSpeed's sub_group_size) the training engine configures: the step
# works on one sub-group at a time, with that sub-group's transient copies (`optimizer_step_bytes`).
# DeepSpeed's default (1e9) makes it a worker's whole partition; 2.5e7 caps the copies at 0.3 GB.
SUB_GROUP_ELEMENTS = 25_000_000
# Bytes per element of one sub-group while it steps: DeepSpeed flattens its gradients into a new fp32
# tensor (4), and torch's AdamW builds its denominator as sqrt(v) / bias_correction (two fp32
# temporaries, 8) before the in-place update.
STEP_BYTES_PER_ELEMENT = 4 + 8


def layer_activation_bytes(arch: Architecture, seq: int, batch: int, elem: int) -> float:
    """One decoder layer's stored activations, after Korthikanti et al. 2022 ("Reducing activation
    recomputation"): s*b*h*(34 + 5*a*s/h) bytes in 16-bit = attention 11h + norms 4h + MLP 19h per token
    (MLP: 2h + 4I + h for I = 4h). Generalised to the real MLP width I (a gated SwiGLU MLP stores gate,
    up, act and product: 8I), to RMSNorm's fp32 upcast (norms ~7h, not 4h: within ~2% of saved-tensor
    hooks on a Llama) and to `elem` bytes per value. The 5*a*s score term only for eager attention:
    SDPA/flash (transformers' default) never stores the s x s scores. MoE: `intermediate` is the
    routed width (k experts x their width), plus the k dispatched copies of the input and of the
    outputs (2kh) and the router's fp32 logits and weights (~4E)."""
    per_token = 21 * arch.hidden + (8 if arch.gated_mlp else 4) * arch.intermediate
    if arch.experts:
        per_token += 2 * arch.experts_per_token * arch.hidden + 4 * arch.experts
    if arch.eager_attention:
        per_token += 5 * arch.heads * seq
    return seq * batch * per_token * elem / 2


def logits_bytes(arch: Architecture, tokens: int, bf16: bool, chunk_tokens: int | None = None) -> float:
    """Memory of the log-prob computation's [tokens, vocab] tensors.

    Full path: 16-bit logits, their fp32 upcast, and one more fp32 [B, T, V] (logsumexp's exp / the
    backward's grad). Chunked path (`model.logprob_chunk_tokens`): at most one chunk's logits exist,
    with its fp32 upcast, exp and gradient: 12 bytes per element (+2 in bf16) fits the measured peak of
    0.19x the full path at 512 tokens (BENCHMARKS.md, "Chunked log-probs").
    """
    if chunk_tokens is None:
        return tokens * arch.vocab * ((2 if bf16 else 0) + 8)
    return min(tokens, chunk_tokens) * arch.vocab * ((2 if bf16 else 0) + 12)


def lora_dropout_bytes(
    arch: Architecture, targets: list[str] | str, tokens: int, elem: int, ckpt: bool
) -> float:
    """LoRA with lora.dropout > 0: every adapted linear's input goes through its own dropout, whose
    output (`elem` bytes) the adapter's backward keeps, with the dropout mask (1 byte), per token: the
    q, k and v projections each keep a copy of the one input the layer formula counts once. Under
    gradient checkpointing one layer's worth at a time."""
    per_token = arch.lora_input_features(targets) / (arch.layers if ckpt else 1)
    return tokens * per_token * (elem + 1)


def activations_bytes(arch: Architecture, seq: int, batch: int, elem: int, checkpointing: bool) -> float:
    # Outside the layers: the final norm (fp32 upcast) and the lm_head's input, ~6h per token.
    outside = seq * batch * 6 * arch.hidden * elem / 2
    layer = layer_activation_bytes(arch, seq, batch, elem)
    if checkpointing:
        # Each layer keeps only its input; backward recomputes one layer's full working set at a time.
        return arch.layers * seq * batch * arch.hidden * elem + layer + outside
    return arch.layers * layer + outside


def model_states(
    arch: Architecture,
    gpus: int,
    gpus_per_node: int,
    opt: bool,
    params: bool,
    elem: int = 2,
    trainable: int | None = None,
) -> tuple[float, float, float, float]:
    """DeepSpeed's ZeRO-3 formulas (zero_init=True): 18 bytes/param sharded over all GPUs = 16-bit params
    (2) + fp32 grads (4) + fp32 master weights and Adam m, v (12); plus 4 bytes x the largest layer
    gathered on every GPU. Offloaded parts move to CPU, where DeepSpeed adds a 1.5x buffer factor.
    Generalised to `elem`-byte params (fp32 on CPU: 4, and DeepSpeed still keeps its own fp32 copy) and
    to `trainable` params (LoRA: the adapters; the frozen base has a param shard only, and its gathered
    layer no gradient)."""
    total, largest = arch.total_params, arch.largest_layer_params
    trainable = total if trainable is None else trainable
    nodes = math.ceil(gpus / gpus_per_node)
    on_node = min(gpus, gpus_per_node)
    gpu_params = 0.0 if params else elem * total / gpus
    gpu_opt = 0.0 if opt else 16 * trainable / gpus
    if opt:
        cpu = (16 * trainable + (elem * total if params else 0)) / nodes * BUFFER_FACTOR
    else:
        cpu = largest * 4 * on_node * BUFFER_FACTOR
    buffer = (2 if trainable == total else 1) * elem * largest
    if elem == 4 and not opt:
        # fp32: the 4 bytes of "fp32 grads" are the gradient buffer itself, and the step's copies come on
        # top (with 16-bit params DeepSpeed's formula counts fp32 grads beside the 16-bit ones).
        buffer += optimizer_step_bytes(trainable, gpus)
    return gpu_params, gpu_opt, float(buffer), cpu


def optimizer_step_bytes(trainable: int, gpus: int) -> float:
    """The optimizer step's transient memory on a worker: one sub-group (at most SUB_GROUP_ELEMENTS of
    its partition of the trainable params) of flattened fp32 gradients and Adam's temporaries."""
    return STEP_BYTES_PER_ELEMENT * min(SUB_GROUP_ELEMENTS, trainable / gpus)


def zero2_model_states(arch: Architecture, gpus: int, elem: int = 2, trainable: int | None = None) -> float:
    """DeepSpeed's ZeRO-2 formula without offload: every GPU holds all 16-bit params (2 bytes/param);
    16-bit and fp32 grads, fp32 master weights and Adam moments (18 bytes/param) are sharded."""
    trainable = arch.total_params if trainable is None else trainable
    return elem * arch.total_params + int((elem + 16) * trainable / gpus)
