"""Load/save HF models and tokenizers, the tiny offline default, log-prob helpers.

Everything saved here is a standard HF directory (safetensors + tokenizer with a chat
template) that `AutoModelForCausalLM.from_pretrained(dir)` opens with no project code.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from components.config import ModelConfig, TinyModelConfig
from components.errors import KfpGrpoError
from components.io import atomic_path

TINY = "tiny"
# Tags of the answer format are single tokens, so a tiny model emits them in one step.
FORMAT_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    """CUDA when present (GPU node pools), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ModelLoadError(KfpGrpoError, ValueError):
    """A model directory or id cannot be loaded as asked; the message says why."""


def _load_errors() -> tuple[type[BaseException], ...]:
    """What loading a damaged model directory raises: a truncated or corrupt safetensors file
    (SafetensorError), weights of the wrong shape for the config (RuntimeError), ..."""
    from safetensors import SafetensorError

    return OSError, ValueError, KeyError, SafetensorError, RuntimeError


def _damaged(path: str, err: BaseException) -> str:
    text = str(err)
    if "ignore_mismatched_sizes" in text or "size mismatch" in text:
        return ("its weights do not have the shapes its config.json describes (a checkpoint of another model "
                "size, or a config.json from elsewhere?)")
    if type(err).__name__ != "SafetensorError":
        return _short(err)
    weights = sorted(p.name for p in Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    where = f"{path}/{weights[0]}" if len(weights) == 1 else path
    return f"{where} is damaged (a truncated or interrupted copy?): {text}"


def check_finite_weights(model: PreTrainedModel, path: str) -> None:
    """ModelLoadError naming the first parameter holding NaN/inf: a model that would sample garbage."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ModelLoadError(f"model {path} has NaN/inf weights (first in {name}); it cannot sample — "
                                 "use an earlier checkpoint")


# --------------------------------------------------------------------------- tiny default
def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII, built offline with `tokenizers`.

    Special and format tokens are single ids; everything else is one character per
    token, so any English/arithmetic text round-trips exactly.
    """
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + FORMAT_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in FORMAT_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=4096,
    )


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised small Llama (seeded), sized by `cfg`."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


# --------------------------------------------------------------------------- load / save
def _check_dir(path: str) -> None:
    p = Path(path)
    looks_local = p.is_absolute() or path.startswith(".") or os.sep in path and p.exists()
    if looks_local and not p.exists():
        raise ModelLoadError(f"model directory not found: {path}")
    if p.is_dir() and not (p / "config.json").exists() and not any(p.glob("*.gguf")):
        raise ModelLoadError(f"{path} is not a HF model directory (no config.json)")


def _short(err: BaseException) -> str:
    """transformers' error without its list of every supported config class."""
    text = str(err)
    if "Unrecognized configuration class" in text:
        kind = text.split("<class '")[1].split("'>")[0].rsplit(".", 1)[-1] if "<class '" in text else "the config"
        auto = text.split("AutoModel: ")[1].split(".")[0] if "AutoModel: " in text else "this AutoModel class"
        return f"{kind} is not an architecture {auto} can load"
    return text


def load_tokenizer(path: str, gguf_file: str | None = None, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer; it must carry a chat template (prompts go through it)."""
    _check_dir(path)
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kw)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {err}") from None
    if not tok.chat_template:
        raise ModelLoadError(f"tokenizer at {path} has no chat template; kfp-grpo formats prompts with it")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_policy(path: str, cfg: ModelConfig | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory or hub id.

    Only safetensors weights and no remote code, unless the config allows them.
    """
    cfg = cfg or ModelConfig()
    gguf = cfg.gguf_file if path == cfg.policy else None
    tok = load_tokenizer(path, gguf, cfg.trust_remote_code)
    kw = {"gguf_file": gguf} if gguf else {"use_safetensors": cfg.use_safetensors or None}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code, **kw
        )
    except _load_errors() as err:
        raise ModelLoadError(f"cannot load a causal LM from {path}: {_damaged(path, err)}") from None
    heads = [a for a in (model.config.architectures or [])
             if a.endswith(("ForSequenceClassification", "ForTokenClassification"))]
    if heads:
        raise ModelLoadError(f"cannot load a causal LM from {path}: it holds a {heads[0]} (a reward model?); "
                             "pass the policy directory")
    if gguf:  # transformers dequantized the GGUF weights on load: a plain torch model from here on,
        model.hf_quantizer = None  # which save_pretrained then writes as safetensors
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(default_device()), tok


def load_reward_model(path: str, cfg: ModelConfig | None = None,
                      new_head: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a scalar reward model (sequence classifier, num_labels=1).

    `new_head`: `path` is a policy (causal LM) whose backbone gets a freshly initialised score
    head (the reward_model stage); otherwise `path` must hold a trained reward model, since a
    policy directory would silently score with a random head.
    """
    cfg = cfg or ModelConfig()
    tok = load_tokenizer(path, None, cfg.trust_remote_code)
    if not new_head:
        try:
            archs = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("architectures") or []
        except (OSError, ValueError, AttributeError):
            archs = []
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ModelLoadError(f"{path} is not a reward model: it holds a {archs[0]} (a policy?), whose score "
                                 "head would be random; pass the reward model's directory")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code,
            use_safetensors=cfg.use_safetensors or None,
        )
    except _load_errors() as err:
        raise ModelLoadError(f"cannot load a reward model from {path}: {_damaged(path, err)}") from None
    model.config.pad_token_id = tok.pad_token_id
    return model.to(default_device()), tok


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path,
               extra: dict[str, object] | None = None) -> None:
    """Save model + tokenizer as a standard HF directory, atomically.

    `extra` maps file names to objects saved with torch.save beside the weights
    (e.g. the optimizer state); HF loaders ignore them.
    """
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, obj in (extra or {}).items():
            torch.save(obj, tmp / name)


def dequantize_gguf(model_dir: str, gguf_file: str, out_dir: str | Path) -> Path:
    """Dequantize `model_dir`/`gguf_file` once into a standard HF directory at `out_dir`.

    transformers dequantizes a GGUF file on every load (tens of seconds for a 135M model);
    the directory written here (float32 safetensors + the tokenizer with its chat template)
    loads in about a second with no `gguf_file`. A directory already at `out_dir` holding
    a config.json is kept as it is (the cache); remove it to convert again.
    """
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    model, tok = load_policy(model_dir, ModelConfig(policy=model_dir, gguf_file=gguf_file))
    save_model(model, tok, out)
    return out


def initial_policy(cfg: ModelConfig, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The starting point of SFT: the tiny model built offline, or a pretrained one."""
    if cfg.policy == TINY:
        tok = build_tiny_tokenizer()
        return build_tiny_model(cfg.tiny, tok, seed).to(default_device()), tok
    return load_policy(cfg.policy, cfg)


# --------------------------------------------------------------------------- prompts / log-probs
def chat_prompt(tokenizer: PreTrainedTokenizerBase, problem: str, system_prompt: str | None = None) -> str:
    """The problem text as a user turn through the chat template, ready to generate."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": problem}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded prompt ids/mask (templated text already contains the BOS)."""
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists → (ids [N,T], mask [N,T]); T ≥ 1."""
    width = max([len(s) for s in seqs] + [1])
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def cache_kwargs(model: PreTrainedModel, cache) -> dict[str, object]:
    """`cache` as the keyword the model's forward takes: `cache` (transformers ≥ 5.24) or
    `past_key_values` (earlier 5.x, and remote-code models)."""
    return {"cache" if "cache" in _forward_parameters(model) else "past_key_values": cache}


def last_logits_only(model: PreTrainedModel) -> dict[str, object]:
    """`logits_to_keep=1` where the model's forward takes it: the LM head runs on the last position only."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}


def _forward_parameters(model: PreTrainedModel) -> frozenset[str]:
    params = getattr(model, "_kfp_grpo_forward_parameters", None)
    if params is None:
        params = frozenset(inspect.signature(model.forward).parameters)
        model._kfp_grpo_forward_parameters = params
    return params


def completion_logprobs(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                        completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                        with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log π(o_t | q, o_<t) of right-padded completions after left-padded prompts.

    Returns (logp [N,T], entropy [N,T] or None); padded positions hold 0.
    Position ids follow the attention mask so left padding does not shift positions.
    """
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    p_len, t_len = prompt_ids.shape[1], completion_ids.shape[1]
    logits = logits[:, p_len - 1 : p_len - 1 + t_len].float()
    logprobs = F.log_softmax(logits, dim=-1)
    logp = logprobs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) * completion_mask
    entropy = None
    if with_entropy:
        entropy = -(logprobs.exp() * logprobs).sum(-1) * completion_mask
    return logp, entropy


def shared_prompt_logprobs(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           prompt_index: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                           with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`completion_logprobs` for rows that share prompts, e.g. the G samples of a GRPO group.

    prompt_ids/prompt_mask hold the distinct left-padded prompts [U, P]; row i continues
    prompt prompt_index[i]. Each prompt runs through the model once, its KV cache is
    repeated for its rows (gradients flow back through it), and only the completions run
    per row. Returns (logp [N, T], entropy [N, T] or None) as `completion_logprobs`.
    """
    p_len = prompt_ids.shape[1]
    position_ids = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = None
    if p_len >= 2:
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt_ids[:, :-1], attention_mask=prompt_mask[:, :-1], position_ids=position_ids[:, :-1],
              use_cache=True, **cache_kwargs(model, cache), **last_logits_only(model))
    if cache is None or cache.get_seq_length() == 0:  # a 1-token prompt, or no KV cache (activation checkpointing)
        return completion_logprobs(model, prompt_ids[prompt_index], prompt_mask[prompt_index], completion_ids,
                                   completion_mask, with_entropy)
    cache.batch_select_indices(prompt_index)
    ids = torch.cat([prompt_ids[prompt_index, -1:], completion_ids[:, :-1]], dim=1)  # predicts completion_ids
    mask = torch.cat([prompt_mask[prompt_index], completion_mask[:, :-1]], dim=1)   # cache + ids
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, p_len - 1:]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **cache_kwargs(model, cache)).logits
    logprobs = F.log_softmax(logits.float(), dim=-1)
    logp = logprobs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) * completion_mask
    entropy = -(logprobs.exp() * logprobs).sum(-1) * completion_mask if with_entropy else None
    return logp, entropy


def batched(n: int, size: int):
    """Slices covering range(n) in chunks of `size`."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))
