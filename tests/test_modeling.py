"""Modeling helpers with real tiny HF models: tokenizer, chat template, save/load, log-probs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from components.config import ModelConfig, TinyModelConfig
from components.io import MARKER
from components.modeling import (
    FORMAT_TOKENS,
    ModelLoadError,
    build_tiny_model,
    build_tiny_tokenizer,
    chat_prompt,
    completion_logprobs,
    encode_prompts,
    load_policy,
    load_reward_model,
    load_tokenizer,
    pad_right,
    save_model,
)

SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=128)
GSM8K_LIKE = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
              "How many clips did Natalia sell altogether in April and May?\n"
              "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72")


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    m = build_tiny_model(SMALL, tok, seed=3)
    m.eval()
    return m


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model, tok) -> Path:
    d = tmp_path_factory.mktemp("modeling") / "policy"
    save_model(model, tok, d)
    return d


# --------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("text", [
    "12+37=49", "What is 7 * (3 - 12)?", "<answer>85</answer>", "<think>48/2 = 24</think><answer>72</answer>",
    GSM8K_LIKE, "  leading and trailing spaces\tand a tab  ", "",
])
def test_tiny_tokenizer_round_trips_text(tok, text):
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids


def test_tiny_tokenizer_is_character_level_with_single_token_tags(tok):
    assert len(tok("12+37=49", add_special_tokens=False).input_ids) == len("12+37=49")
    for tag in FORMAT_TOKENS:
        assert len(tok(tag, add_special_tokens=False).input_ids) == 1, tag
    ids = tok("<answer>85</answer>", add_special_tokens=False).input_ids
    assert ids == [tok.convert_tokens_to_ids("<answer>"), tok.convert_tokens_to_ids("8"),
                   tok.convert_tokens_to_ids("5"), tok.convert_tokens_to_ids("</answer>")]
    # the format tags are content (kept when skipping specials), the chat markers are not
    assert tok.decode(ids, skip_special_tokens=True) == "<answer>85</answer>"
    assert tok.decode([tok.convert_tokens_to_ids("<|user|>"), tok.eos_token_id] + ids,
                      skip_special_tokens=True) == "<answer>85</answer>"
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    assert tok.padding_side == "left"


def test_chat_template_renders_user_turn_and_generation_prompt(tok):
    assert chat_prompt(tok, "3+4") == "<s><|user|>3+4<|assistant|>"
    assert chat_prompt(tok, "3+4", "Be brief.") == "<s><|system|>Be brief.<|user|>3+4<|assistant|>"
    full = tok.apply_chat_template([{"role": "user", "content": "3+4"},
                                    {"role": "assistant", "content": "<answer>7</answer>"}], tokenize=False)
    assert full == "<s><|user|>3+4<|assistant|><answer>7</answer></s>"
    ids = tok(chat_prompt(tok, "3+4"), add_special_tokens=False).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert ids.count(tok.bos_token_id) == 1


# --------------------------------------------------------------------------- save / load
def test_saved_dir_is_a_plain_hf_directory(saved, model, tok):
    files = {p.name for p in saved.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not any(f.endswith(".bin") for f in files)
    assert not any(f.startswith(".") for f in files - {MARKER})  # no temp leftovers (the marker: ours, see io)
    assert not list(saved.parent.glob(".policy.tmp-*"))
    # no project code: plain transformers opens it
    hf_tok = AutoTokenizer.from_pretrained(saved)
    hf_model = AutoModelForCausalLM.from_pretrained(saved)
    assert hf_tok.chat_template
    msgs = [{"role": "user", "content": "3+4"}]
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == "<s><|user|>3+4<|assistant|>"
    assert hf_tok.decode(hf_tok(GSM8K_LIKE, add_special_tokens=False).input_ids) == GSM8K_LIKE
    assert hf_tok.pad_token == "<pad>" and hf_tok.eos_token == "</s>"
    ids = torch.tensor([tok(chat_prompt(tok, "12+30"), add_special_tokens=False).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids).logits)
    assert hf_model.config.eos_token_id == tok.eos_token_id and hf_model.config.pad_token_id == tok.pad_token_id


def test_load_policy_round_trips_weights(saved, model):
    loaded, tok = load_policy(str(saved))
    assert tok.padding_side == "left" and tok.chat_template
    assert loaded.generation_config.pad_token_id == tok.pad_token_id
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert next(loaded.parameters()).dtype == torch.float32
    half, _ = load_policy(str(saved), ModelConfig(dtype="bfloat16"))
    assert next(half.parameters()).dtype == torch.bfloat16


def test_load_policy_missing_dir(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=f"not found: {missing}"):
        load_policy(str(missing))
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_reward_model(str(missing))


def test_load_policy_dir_without_config(tmp_path, saved):
    d = tmp_path / "weights-only"
    d.mkdir()
    (d / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match=f"{d} is not a HF model directory \\(no config.json\\)"):
        load_policy(str(d))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=str(empty)):
        load_policy(str(empty))


def test_a_reward_model_directory_is_refused_as_policy(tmp_path, saved, tok):
    """An RM (sequence classifier) passed where a policy goes would load as a causal LM with a random
    LM head; it is refused naming what it holds."""
    from transformers import AutoModelForSequenceClassification

    rm_dir = tmp_path / "rm"
    save_model(AutoModelForSequenceClassification.from_pretrained(str(saved), num_labels=1), tok, rm_dir)
    with pytest.raises(ModelLoadError, match=f"{rm_dir}: it holds a LlamaForSequenceClassification"):
        load_policy(str(rm_dir))
    assert load_reward_model(str(rm_dir))[0].config.num_labels == 1  # still a good reward model


def test_tokenizer_without_chat_template_is_refused(tmp_path, model):
    d = tmp_path / "no-template"
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    model.save_pretrained(d)
    tok.save_pretrained(d)
    assert not (d / "chat_template.jinja").exists()
    assert not json.loads((d / "tokenizer_config.json").read_text()).get("chat_template")
    with pytest.raises(ModelLoadError, match=f"tokenizer at {d} has no chat template"):
        load_policy(str(d))
    with pytest.raises(ModelLoadError, match=str(d)):
        load_tokenizer(str(d))


def _bin_only_dir(d: Path, model, tok) -> Path:
    """A HF directory whose weights are a pickle (pytorch_model.bin), no safetensors.

    transformers 5 always writes safetensors (save_pretrained(safe_serialization=False)
    is accepted and ignored), so the .bin is written the way older versions did.
    """
    model.save_pretrained(d, safe_serialization=False)
    tok.save_pretrained(d)
    (d / "model.safetensors").unlink(missing_ok=True)
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, d / "pytorch_model.bin")
    assert not list(d.glob("*.safetensors"))
    return d


def test_use_safetensors_refuses_pickle_weights(tmp_path, model, tok):
    d = _bin_only_dir(tmp_path / "bin-only", model, tok)
    with pytest.raises(ModelLoadError, match=f"cannot load a causal LM from {d}"):
        load_policy(str(d))
    with pytest.raises(ModelLoadError, match=str(d)):
        load_reward_model(str(d))
    # allowed when the config opts in: the pickle is loaded, weights identical
    loaded, _ = load_policy(str(d), ModelConfig(use_safetensors=False))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_remote_code_is_not_trusted_by_default(tmp_path, model, tok):
    """A directory that ships its own modeling code: by default that code never runs."""
    assert ModelConfig().trust_remote_code is False
    d = tmp_path / "remote"
    save_model(model, tok, d)
    marker = tmp_path / "REMOTE_CODE_RAN"
    (d / "evil_modeling.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM, LlamaConfig\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "evil"
    config["auto_map"] = {"AutoConfig": "evil_modeling.EvilConfig",
                          "AutoModelForCausalLM": "evil_modeling.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=str(d)):
        load_policy(str(d))
    assert not marker.exists()


# --------------------------------------------------------------------------- log-probs
def _alone(model, tok, prompt: str, completion_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle: log-probs and entropies of one unpadded sequence, straight from the logits."""
    p = tok(prompt, add_special_tokens=False).input_ids
    ids = torch.tensor([p + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logprobs = F.log_softmax(logits[len(p) - 1 : len(p) - 1 + len(completion_ids)], -1)
    lp = logprobs.gather(-1, torch.tensor(completion_ids).unsqueeze(-1)).squeeze(-1)
    ent = -(logprobs.exp() * logprobs).sum(-1)
    return lp, ent


def test_completion_logprobs_padded_batch_equals_each_sequence_alone(model, tok):
    problems = ["3+4", "What is 13 + 27? Think first.", "9", "100-1"]
    completions = ["<answer>7</answer></s>", "<think>13+27=40</think><answer>40</answer>", "7", "<answer>99"]
    prompts = [chat_prompt(tok, p) for p in problems]
    comp_ids = [tok(c, add_special_tokens=False).input_ids for c in completions]
    enc = encode_prompts(tok, prompts)
    assert (enc["attention_mask"] == 0).any(), "prompts must be left-padded for this test"
    assert (enc["attention_mask"][:, -1] == 1).all()
    c_ids, c_mask = pad_right(comp_ids, tok.pad_token_id)
    with torch.no_grad():
        lp, ent = completion_logprobs(model, enc["input_ids"], enc["attention_mask"], c_ids, c_mask, with_entropy=True)
        lp_only, none = completion_logprobs(model, enc["input_ids"], enc["attention_mask"], c_ids, c_mask)
    assert none is None
    torch.testing.assert_close(lp_only, lp)
    assert lp.shape == ent.shape == c_ids.shape
    vocab = model.config.vocab_size
    for i, (prompt, ids) in enumerate(zip(prompts, comp_ids)):
        want_lp, want_ent = _alone(model, tok, prompt, ids)
        n = len(ids)
        torch.testing.assert_close(lp[i, :n], want_lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent[i, :n], want_ent, atol=1e-5, rtol=0)
        assert (lp[i, :n] < 0).all()
        assert (lp[i, n:] == 0).all() and (ent[i, n:] == 0).all()  # padding holds 0
        assert (ent[i, :n] >= 0).all() and (ent[i, :n] <= math.log(vocab) + 1e-4).all()


def test_entropy_is_non_negative_even_for_peaked_distributions(tok):
    m = build_tiny_model(SMALL, tok, seed=5)
    with torch.no_grad():  # a huge output scale makes the distributions nearly one-hot
        m.lm_head.weight.mul_(200.0)
    m.eval()
    enc = encode_prompts(tok, [chat_prompt(tok, "1+1"), chat_prompt(tok, "20+22")])
    c_ids, c_mask = pad_right([tok("<answer>2</answer>", add_special_tokens=False).input_ids, [5, 6]],
                              tok.pad_token_id)
    with torch.no_grad():
        lp, ent = completion_logprobs(m, enc["input_ids"], enc["attention_mask"], c_ids, c_mask, with_entropy=True)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert (ent >= 0).all()


def test_completion_logprobs_carry_gradients(model, tok):
    enc = encode_prompts(tok, [chat_prompt(tok, "2+2")])
    c_ids, c_mask = pad_right([tok("<answer>4</answer>", add_special_tokens=False).input_ids], tok.pad_token_id)
    lp, _ = completion_logprobs(model, enc["input_ids"], enc["attention_mask"], c_ids, c_mask)
    lp.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)
