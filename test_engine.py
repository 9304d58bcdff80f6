"""The tests, one class per module, each against an independent reference.

    python -m pytest -q test_engine.py                 # CPU: the Triton kernels run in the Triton interpreter
    python -m pytest -q test_engine.py::TestScheduler  # one module's tests (TestModel, TestKVCache, ...)
    python3 -m pytest -q test_engine.py                # on a GPU: also the kernels in bf16, and CUDA graphs
"""
import re
import socket
import subprocess
import sys
import threading
import time
import functools
import itertools
import json
from collections import Counter
from multiprocessing import resource_tracker
import math
import os
import random
from dataclasses import replace

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is imported

import pytest  # noqa: E402
import tiktoken  # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import bench  # noqa: E402
import engine  # noqa: E402
import model  # noqa: E402
import kv_cache  # noqa: E402
import attention  # noqa: E402
from attention import FP8  # noqa: E402
from attention import (AttentionMetadata, LaunchConfig, choose_launch_config, paged_attention,  # noqa: E402
                       paged_attention_reference, rope_and_write_kv, rope_and_write_kv_reference)
from engine import LLM  # noqa: E402
from kv_cache import (BlockTable, KVCacheManager, allocate_kv_cache, check_kv_capacity, hash_block,  # noqa: E402
                      kv_cache_bytes_per_block, num_blocks_from_memory, ROOT_HASH)
from model import (SHAPES, Llama3RopeScaling, Tokenizer, Transformer, add_rms_norm,  # noqa: E402
                   add_rms_norm_reference, load_model, load_tokenizer, random_model, read_config, rope_tables,
                   silu_and_mul, silu_and_mul_reference)
from scheduler import EngineConfig, Request, RequestStatus, SamplingParams, Scheduler  # noqa: E402
import sampler  # noqa: E402
import scheduler as scheduler_module  # noqa: E402
import numpy as np  # noqa: E402

_CUDA = torch.cuda.is_available()
_DEVICE = "cuda" if _CUDA else "cpu"
_DTYPES = [torch.bfloat16, torch.float16] if _CUDA else [torch.float32, torch.float16]


# ==== shared helpers: closeness, checkpoints, paged batches =======================================

# Per dtype of the kernel's output: the attention kernels' bound on ||out - ref|| / ||ref||, and the fused
# kernels' (rtol, atol) per element, one or two units in the last place (they compute in fp32).
_RELATIVE_ERROR = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}
_ELEMENTWISE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}


def _randn(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(_DEVICE)


def _relative_error(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-6)).item()


def _assert_close(out, ref, elementwise=False):
    """out, a kernel's result in its own dtype, against ref (computed in fp64 or fp32) within out.dtype's
    tolerance: of the whole tensor's relative error, or of every element."""
    if elementwise:
        rtol, atol = _ELEMENTWISE[out.dtype]
        torch.testing.assert_close(out, ref.to(out.dtype), rtol=rtol, atol=atol)
    else:
        assert not out.isnan().any(), "NaN in kernel output"
        error = _relative_error(out, ref)
        assert error < _RELATIVE_ERROR[out.dtype], f"relative error {error:.2e}"


def _hf_checkpoint(path, architecture: str, tie: bool = False, shard: bool = False, **overrides):
    """A tiny HF model of `architecture` with every weight random (norms and biases too), saved to `path`
    by save_pretrained (in 60 KB shards if `shard`); returns the HF model, the tests' reference."""
    import transformers
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=tie, eos_token_id=7, bos_token_id=1,
                  attn_implementation="eager")
    common.update(overrides)
    config = getattr(transformers, architecture.replace("ForCausalLM", "Config"))(**common)
    torch.manual_seed(0)
    hf = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():
        for name, parameter in hf.named_parameters():
            if "norm" in name:
                parameter.copy_(1 + 0.3 * torch.randn_like(parameter))
            elif name.endswith("bias"):
                parameter.copy_(0.3 * torch.randn_like(parameter))
            else:
                parameter.copy_(torch.randn_like(parameter) / math.sqrt(parameter.shape[-1]))
    hf.save_pretrained(path, max_shard_size="60KB" if shard else "1GB")
    return hf


def _paged_batch(lengths, starts, block_tables, block_size, device="cpu"):
    """Positions and metadata for requests whose rows are positions starts[i]..lengths[i]-1 (a
    prefix of starts[i] tokens already in the cache)."""
    query_lens = [length - start for start, length in zip(starts, lengths)]
    meta = AttentionMetadata.from_lengths(query_lens, lengths, block_tables, block_size, device)
    positions = [p for start, length in zip(starts, lengths) for p in range(start, length)]
    return torch.tensor(positions, dtype=torch.int64, device=device), meta


def _kv_cache(config, num_blocks, block_size):
    # random contents: a kernel that reads a slot it has not written shows up as a wrong logit
    return torch.randn(config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim,
                       dtype=config.dtype)


# Checkpoints built by the tests mostly have no tokenizer: the engine's warning about it is expected.
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json:UserWarning")


# ==== model.py ====================================================================================

HF_CASES = {
    "llama": ("LlamaForCausalLM", dict(), False),
    "llama3-rope-tied": ("LlamaForCausalLM", dict(tie=True, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64), rope_theta=500000.0), True),
    "mistral-head-dim": ("MistralForCausalLM", dict(sliding_window=None, head_dim=32), False),
    "qwen2-bias-tied": ("Qwen2ForCausalLM", dict(tie=True), True),
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=16), True),
    "qwen3-tied": ("Qwen3ForCausalLM", dict(head_dim=32, tie=True), False),
}


def _write_config(path, **changes):
    raw = dict(architectures=["LlamaForCausalLM"], vocab_size=100, hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
    raw.update(changes)
    (path / "config.json").write_text(json.dumps(raw))
    return str(path)


def _checkpoint(path) -> str:
    """A tiny random Llama saved by HF (config.json, generation_config.json, model.safetensors)
    that loads: the corruptions below start from it."""
    _hf_checkpoint(path, "LlamaForCausalLM")
    assert _load(str(path)).config.num_layers == 2
    return str(path)


def _load(path):
    return model.load_model(path, dtype=torch.float32, device="cpu")


def _one_batch(config, prompt_lens, block_size=8):
    generator = torch.Generator().manual_seed(0)
    needed = [math.ceil(n / block_size) for n in prompt_lens]
    tables = [list(range(sum(needed[:i]), sum(needed[: i + 1]))) for i in range(len(needed))]
    positions, meta = _paged_batch(prompt_lens, [0] * len(prompt_lens), tables, block_size)
    input_ids = torch.randint(0, config.vocab_size, (len(positions),), generator=generator)
    return input_ids, positions, _kv_cache(config, sum(needed), block_size), meta

_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it? We'll see, they've said.",
    "Un café à Paris coûte 3,50 €; naïve façade, Übergröße, señor, smörgåsbord, Ærø.",
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다。",
    "Emoji: 🙂👍🏽🚀🇫🇷 and ✨ sparkles ✨ — dashes – and “quotes”.",
    "def main():\n    for i in range(10):\n        print(i * 3.14159)\n\n\n    return 42\n",
    "Numbers 1234567890 0.001 -17 1e9 and spaces     between\t\ttabs\r\nand CRLF lines.",
] * 20
_TEXTS = [
    "Hello world! The quick brown fox.", "  leading spaces and trailing   ", "\n\n\nnewlines\n \n",
    "Ça va très bien, merci. Zoë's naïve café.", "日本語と中文と한국어の混在テキスト", "🙂🙃 emoji 🚀🇫🇷👍🏽 mix",
    "digits 31415926535 and 007 and 1,000,000.5", "tabs\tand\r\nwindows line\r\nendings",
    "unseen: xylophone quizzical zephyr Ωμέγα Привет", "e\u0301 decomposed vs é composed",
    "<|endoftext|>special<|im_start|>user\nhi<|im_end|>", "<think>x</think> <think>", "", " ", "a" * 300,
]
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def gpt2_style(tmp_path_factory):
    """A byte-level BPE trained by HF tokenizers (GPT-2 regex; specials first in the vocab)."""
    from tokenizers import ByteLevelBPETokenizer
    hf = ByteLevelBPETokenizer()
    hf.train_from_iterator(_CORPUS, vocab_size=500, min_frequency=1, special_tokens=_SPECIALS, show_progress=False)
    hf.add_tokens(["<think>"])  # an added token that is not special: kept by skip_special_tokens
    path = tmp_path_factory.mktemp("gpt2_style")
    hf.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    from tokenizers import Tokenizer as HFTokenizer
    return HFTokenizer.from_file(str(path / "tokenizer.json")), str(path)

_LLAMA3_SPECIAL_NAMES = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                         "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                         "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def llama3_style(tmp_path_factory):
    """Llama 3's layout: a Split regex then ByteLevel, NFC (as Qwen2 has), specials after the
    merges, and a post-processor that puts BOS first."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as HFTokenizer
    hf = HFTokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf.add_special_tokens(_LLAMA3_SPECIAL_NAMES)
    bos = hf.token_to_id("<|begin_of_text|>")
    hf.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      special_tokens=[("<|begin_of_text|>", bos)])
    path = tmp_path_factory.mktemp("llama3_style")
    hf.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}}))
    return hf, str(path)


def _check_against_hf(hf, ours: Tokenizer, texts, add_special_tokens: bool):
    for text in texts:
        expected = hf.encode(text, add_special_tokens=add_special_tokens).ids
        ids = ours.encode(text, add_special_tokens=add_special_tokens)
        assert ids == expected, text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text


def _byte_tokenizer():
    """Ids 0..255 are the UTF-8 bytes, 511 is <|endoftext|>: every multi-byte character splits."""
    encoding = tiktoken.Encoding("bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([b]): b for b in range(256)},
                                 special_tokens={"<|endoftext|>": 511})
    return Tokenizer(encoding, None, [511])


def _byte_level_vocab(merges=(), extra=None) -> dict:
    """Byte b has id b, written in GPT-2's byte alphabet (as in the fixtures); merge results follow in merge order."""
    byte_chars = {b: c for c, b in model._byte_level_alphabet().items()}
    return {byte_chars[b]: b for b in range(256)} | {l + r: 256 + i for i, (l, r) in enumerate(merges)} | (extra or {})


def _bpe_tokenizer(path, vocab: dict, merges: list, ignore_merges: bool):
    """A byte-level BPE's tokenizer.json written by HF tokenizers to `path`; returns HF's tokenizer (the reference)."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    hf = HFTokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.save(str(path / "tokenizer.json"))
    return hf


def _every_split_merged(vocab: dict) -> list:
    """Merges as transformers converts a tiktoken vocabulary (Llama 3): every split of a token into two, by id."""
    return [split for token, _ in sorted(vocab.items(), key=lambda item: item[1]) for split in sorted(
        ((token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab),
        key=lambda split: (vocab[split[0]], vocab[split[1]]))]


class TestModel:
    """model.py: config, checkpoint loading and the forward against HF transformers; the tokenizer against HF's."""

    # ---- config, checkpoints, forward

    @pytest.mark.parametrize("case", HF_CASES)
    def test_logits_match_hf_prefill_then_cached_chunk(self, case, tmp_path):
        architecture, overrides, shard = HF_CASES[case]
        hf = _hf_checkpoint(tmp_path, architecture, shard=shard, **overrides)
        path = str(tmp_path)
        if shard:
            assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
        model = load_model(path, dtype=torch.float32, device="cpu")
        assert model.config.architecture == architecture and not model.use_triton

        generator = torch.Generator().manual_seed(1)
        prompt_lens, extra_lens, block_size = [7, 1, 12, 4], [3, 1, 5, 4], 4
        sequences = [torch.randint(0, 300, (p + e,), generator=generator) for p, e in zip(prompt_lens, extra_lens)]
        with torch.no_grad():
            expected = [hf(s[None]).logits[0] for s in sequences]
        needed = [math.ceil((p + e) / block_size) for p, e in zip(prompt_lens, extra_lens)]
        blocks = list(range(sum(needed) + 3))
        random.Random(0).shuffle(blocks)
        tables = [blocks[sum(needed[:i]): sum(needed[: i + 1])] for i in range(len(needed))]
        kv_cache = _kv_cache(model.config, len(blocks), block_size)

        # step 1: all prompts in one flat batch
        positions, meta = _paged_batch(prompt_lens, [0] * 4, tables, block_size)
        input_ids = torch.cat([s[:p] for s, p in zip(sequences, prompt_lens)])
        logits = model(input_ids, positions, kv_cache, meta)
        assert logits.dtype == torch.float32
        reference = torch.cat([e[:p] for e, p in zip(expected, prompt_lens)])
        assert (logits - reference).abs().max() < 1e-4

        # step 2: each request continues with a chunk whose prefix is already in the cache
        total_lens = [p + e for p, e in zip(prompt_lens, extra_lens)]
        positions, meta = _paged_batch(total_lens, prompt_lens, tables, block_size)
        input_ids = torch.cat([s[p:] for s, p in zip(sequences, prompt_lens)])
        logits = model(input_ids, positions, kv_cache, meta)
        reference = torch.cat([e[p:] for e, p in zip(expected, prompt_lens)])
        assert (logits - reference).abs().max() < 1e-4

        # logits_indices: only the requested rows, in the requested order
        last_rows = torch.tensor([12, 2, 8, 3])
        selected = model(input_ids, positions, kv_cache, meta, logits_indices=last_rows)
        assert selected.shape == (4, 300) and (selected - reference[last_rows]).abs().max() < 1e-5

    def test_read_config_both_rope_forms_and_eos_override(self, tmp_path):
        raw = dict(architectures=["LlamaForCausalLM"], vocab_size=100, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   rope_theta=500000.0, eos_token_id=7, tie_word_embeddings=True,
                   rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=64))
        (tmp_path / "config.json").write_text(json.dumps(raw))
        config = read_config(str(tmp_path))
        assert config.rope_theta == 500000.0 and config.rope_scaling.factor == 8.0
        assert config.head_dim == 16 and config.num_kv_heads == 2 and config.tie_word_embeddings
        assert config.eos_token_ids == [7]
        (tmp_path / "generation_config.json").write_text(json.dumps(dict(eos_token_id=[7, 9], bos_token_id=1)))
        del raw["rope_theta"], raw["rope_scaling"]
        raw["rope_parameters"] = dict(rope_type="default", rope_theta=1e6)
        (tmp_path / "config.json").write_text(json.dumps(raw))
        config = read_config(str(tmp_path))
        assert config.rope_theta == 1e6 and config.rope_scaling is None
        assert config.eos_token_ids == [7, 9]

    @pytest.mark.parametrize("changes, message", [
        (dict(architectures=["GPT2LMHeadModel"]), "architecture 'GPT2LMHeadModel' is not supported; supported: Llama"),
        (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "rope scaling type 'yarn' is not supported"),
        (dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4)), "rope scaling type 'linear'"),
        (dict(architectures=["MistralForCausalLM"], sliding_window=64), "sliding_window=64"),
        (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=64), "sliding_window=64"),
        (dict(attention_bias=True), "attention_bias=true is not supported"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    ])
    def test_unsupported_config_errors(self, tmp_path, changes, message):
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            read_config(_write_config(tmp_path, **changes))

    def test_sliding_window_not_in_use_is_accepted(self, tmp_path):
        read_config(_write_config(tmp_path, architectures=["MistralForCausalLM"], sliding_window=256))
        read_config(_write_config(tmp_path, architectures=["Qwen2ForCausalLM"], sliding_window=64))

    def test_checkpoint_tensor_errors(self, tmp_path):
        source = str(tmp_path / "ok")
        _hf_checkpoint(source, "Qwen3ForCausalLM", head_dim=16)
        tensors = load_file(os.path.join(source, "model.safetensors"))

        def broken(name, change):
            path = tmp_path / name
            path.mkdir()
            (path / "config.json").write_text(open(os.path.join(source, "config.json")).read())
            edited = dict(tensors)
            change(edited)
            save_file(edited, str(path / "model.safetensors"))
            return str(path)

        missing = broken("missing", lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
        with pytest.raises(ValueError,
                           match=r"missing tensor\(s\) model.layers.1.self_attn.k_norm.weight in .*model.safetensors"):
            load_model(missing, device="cpu")
        unexpected = broken("unexpected", lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
        with pytest.raises(ValueError,
                           match="unexpected tensor 'model.layers.0.mlp.extra.weight' in .*model.safetensors"):
            load_model(unexpected, device="cpu")
        mismatch = broken("mismatch", lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(95, 64)}))
        with pytest.raises(ValueError,
                           match=r"'model.layers.0.mlp.up_proj.weight' in .*: shape \(95, 64\), expected \(96, 64\)"):
            load_model(mismatch, device="cpu")
        no_weights = broken("no_weights", lambda t: None)
        os.remove(os.path.join(no_weights, "model.safetensors"))
        with pytest.raises(FileNotFoundError, match="no model.safetensors"):
            load_model(no_weights, device="cpu")

    @pytest.mark.parametrize("name, text", [("config.json", '{"vocab_size": 300,'),
                                            ("generation_config.json", "not json"),
                                            ("model.safetensors.index.json", "{"),
                                            ("config.json", "[1, 2]")])
    def test_corrupt_json_names_the_file(self, tmp_path, name, text):
        path = _checkpoint(tmp_path)
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
        with pytest.raises(ValueError, match=re.escape(os.path.join(path, name))):
            _load(path)

    def test_corrupt_tokenizer_json_names_the_file(self, tmp_path):
        (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", ')
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / "tokenizer.json"))):
            model.load_tokenizer(str(tmp_path))

    @pytest.mark.parametrize("file, change, field", [
        ("tokenizer.json", lambda spec: {}, "model"),
        ("tokenizer.json", lambda spec: {k: v for k, v in spec.items() if k != "model"}, "model"),
        ("tokenizer.json", lambda spec: {**spec, "model": "BPE"}, "model"),
        ("tokenizer.json", lambda spec: {**spec, "model": {k: v for k, v in spec["model"].items() if k != "vocab"}},
         "model.vocab"),
        ("tokenizer.json", lambda spec: {**spec, "model": {**spec["model"], "vocab": {"a": "1"}}}, "model.vocab"),
        ("tokenizer.json", lambda spec: {**spec, "model": {**spec["model"], "merges": "a b"}}, "model.merges"),
        ("tokenizer.json", lambda spec: {**spec, "added_tokens": [{"content": "<x>"}]}, "added_tokens"),
        ("tokenizer.json", lambda spec: {**spec, "pre_tokenizer": "ByteLevel"}, "pre_tokenizer"),
        ("config.json", dict(vocab_size="320"), "vocab_size"),
        ("config.json", dict(num_hidden_layers=2.0), "num_hidden_layers"),
        ("config.json", dict(hidden_size=None), "hidden_size"),
        ("config.json", dict(head_dim=0), "head_dim"),
        ("config.json", dict(rms_norm_eps="1e-6"), "rms_norm_eps"),
        ("config.json", dict(tie_word_embeddings="false"), "tie_word_embeddings"),
        ("config.json", dict(eos_token_id=[7, "8"]), "eos_token_id"),
        ("config.json", dict(architectures="LlamaForCausalLM"), "architectures"),
        ("config.json", dict(rope_scaling=dict(rope_type="llama3", factor="8", low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=64)),
         "rope_scaling.factor"),
        ("generation_config.json", dict(eos_token_id="2"), "eos_token_id"),
        ("config.json", "a directory", None),
    ])
    def test_corrupt_fields_name_the_file_and_the_field(self, gpt2_style, tmp_path, file, change, field):
        if file == "tokenizer.json":
            spec = json.loads(open(os.path.join(gpt2_style[1], file), encoding="utf-8").read())
            (tmp_path / file).write_text(json.dumps(change(spec)), encoding="utf-8")
            load = model.load_tokenizer
        else:
            _write_config(tmp_path, **(change if file == "config.json" and field else {}))
            if field is None:
                os.remove(tmp_path / file)
                (tmp_path / file).mkdir()
            elif file != "config.json":
                (tmp_path / file).write_text(json.dumps(change))
            load = read_config
        message = re.escape(str(tmp_path / file)) + ": not a readable JSON file" if field is None else \
            rf"(^|/){re.escape(file)}: {re.escape(field)} must be"
        with pytest.raises(ValueError, match=message):
            load(str(tmp_path))

    @pytest.mark.parametrize("corrupt", ["truncated", "garbage"])
    def test_bad_safetensors_shard_names_the_file(self, tmp_path, corrupt):
        path = _checkpoint(tmp_path)
        shard = tmp_path / "model.safetensors"
        data = shard.read_bytes()
        shard.write_bytes(data[:len(data) // 2] if corrupt == "truncated" else b"\xff" * 64)
        with pytest.raises(ValueError, match=re.escape(str(shard))):
            _load(path)

    def test_missing_shard_in_index_is_named(self, tmp_path):
        path = _checkpoint(tmp_path)
        weight_map = {"model.embed_tokens.weight": "model.safetensors",
                      "model.norm.weight": "model-00002-of-00002.safetensors"}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        # the message says where the name came from, not just that a file is missing
        with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors.*index\.json"):
            _load(path)

    def test_load_tensors_takes_a_dict_or_pairs_of_floating_point_tensors(self, tmp_path):
        path = _checkpoint(tmp_path)
        tensors = load_file(os.path.join(path, "model.safetensors"))
        for given in (tensors, list(tensors.items())):  # a state_dict(), or its items()
            fresh = Transformer(read_config(path), "cpu")
            assert model.load_tensors(fresh, given, "test") == set(tensors)
            targets = model._checkpoint_targets(fresh)  # each HF tensor is in its slice of our fused weights
            assert all(torch.equal(targets[name], tensor) for name, tensor in tensors.items())
        for bad, got in [(torch.ones(64).numpy(), "ndarray"), (torch.ones(64, dtype=torch.int64), "torch.int64"),
                         (torch.ones(64, dtype=torch.bool), "torch.bool")]:
            with pytest.raises(ValueError, match=f"'model.norm.weight' in test: expected a floating-point torch.Tensor, "
                                                 f"got {got}"):
                model.load_tensors(fresh, {"model.norm.weight": bad}, "test")
        with pytest.raises(ValueError, match=r"test: expected a dict of tensors or \(name, tensor\) pairs"):
            model.load_tensors(fresh, list(tensors.values()), "test")
        llm = LLM("tiny", dtype=torch.float32, num_blocks=8, max_model_len=64, max_num_seqs=2)  # the engine's entry point, on a dict
        llm.load_weights({"model.norm.weight": torch.full((64,), 2.0)})
        assert torch.equal(llm.runner.model.norm, torch.full((64,), 2.0, device=llm.runner.model.norm.device))
        with pytest.raises(ValueError, match="'model.norm.weight' in load_weights: .* got torch.int64"):
            llm.load_weights({"model.norm.weight": torch.full((64,), 2)})

    def test_random_tiny_forward(self):
        model = random_model("tiny", device="cpu")
        input_ids, positions, kv_cache, meta = _one_batch(model.config, [5, 9])
        logits = model(input_ids, positions, kv_cache, meta, logits_indices=torch.tensor([4, 13]))
        assert logits.shape == (2, 512) and torch.isfinite(logits).all()
        other_seed = random_model("tiny", device="cpu", seed=1)(input_ids, positions, kv_cache, meta)
        assert not torch.equal(logits, other_seed[[4, 13]])
        half = random_model("tiny", dtype="bf16", device="cpu")
        assert half.embed_tokens.dtype == torch.bfloat16
        logits = half(input_ids, positions, kv_cache.bfloat16(), meta)
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()  # the model's dtype, as HF's

    def test_random_deep_model_stays_finite_and_informative(self):
        config = replace(SHAPES["tiny"], num_layers=48)
        model = random_model(config, device="cpu", seed=3)
        input_ids, positions, kv_cache, meta = _one_batch(model.config, [16, 16])
        logits = model(input_ids, positions, kv_cache, meta)
        assert torch.isfinite(logits).all()
        assert logits.std(dim=-1).min() > 0.3 and logits.abs().max() < 100  # neither uniform nor exploding
        assert (logits[15] - logits[31]).abs().max() > 0.3  # different contexts, different predictions

    def test_named_shapes_have_the_published_sizes(self):
        for name, expected in [("llama3-8b", 8_030_261_248), ("qwen3-0.6b", 596_049_920)]:
            model = Transformer(SHAPES[name], "meta")
            assert sum(p.numel() for p in model.parameters()) == expected, name

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="dtype 'int8' is not supported; supported: bf16"):
            random_model("tiny", dtype="int8", device="cpu")
        with pytest.raises(ValueError, match="model shape 'gpt5' is unknown; known: qwen3-0.6b"):
            random_model("gpt5")
        missing = ["cuda:99"] + ([] if _CUDA else ["cuda", torch.device("cuda", 0)])
        for device in missing:  # a ValueError naming the device, not torch's AssertionError
            with pytest.raises(ValueError, match=f"device='{device}': (CUDA is not available|this machine has)"):
                random_model("tiny", device=device)
        with pytest.raises(ValueError, match="device='cuda:99'"):
            LLM("tiny", device="cuda:99")
        with pytest.raises(ValueError, match="device='tpu' is not a device, e.g. 'cuda'"):
            random_model("tiny", device="tpu")
        model = random_model("tiny", device="cpu")
        input_ids, positions, kv_cache, meta = _one_batch(model.config, [3])
        with pytest.raises(ValueError, match=r"kv_caches: shape .*; expected \[2, 2, num_blocks, block_size, 2, 16\]"):
            model(input_ids, positions, kv_cache[:, :, :, :, :1], meta)

    # ---- tokenizer

    def test_gpt2_style_tokenizer_matches_hf(self, gpt2_style):
        hf, path = gpt2_style
        ours = load_tokenizer(path)
        _check_against_hf(hf, ours, _TEXTS, add_special_tokens=True)
        assert ours.encode("<|im_end|>") == [2] and not ours.add_bos_token
        # tokenizer_config.json's EOS only: the engine adds the model's (generation_config.json's [0, 2])
        assert ours.eos_token_ids == [2] and ours.bos_token_id is None
        assert ours.vocab_size == hf.get_vocab_size() == 501
        assert ours.decode(ours.encode("a<think><|im_end|>"), skip_special_tokens=True) == "a<think>"
        assert sum(len(ours.encode(t)) for t in _TEXTS) < sum(len(t.encode()) for t in _TEXTS) * 0.8  # merges used

    def test_llama3_style_tokenizer_matches_hf(self, llama3_style):
        hf, path = llama3_style
        ours = load_tokenizer(path)
        assert ours.add_bos_token and ours.bos_token_id == hf.token_to_id("<|begin_of_text|>")
        assert ours.eos_token_ids == [hf.token_to_id("<|eot_id|>")]
        texts = _TEXTS + ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"]
        _check_against_hf(hf, ours, texts, add_special_tokens=True)
        _check_against_hf(hf, ours, texts, add_special_tokens=False)
        assert ours.encode("e\u0301", add_special_tokens=False) == ours.encode("é", add_special_tokens=False)

    def test_streaming_decode(self, gpt2_style):
        _, path = gpt2_style
        ours = load_tokenizer(path)
        saw_partial = False
        for text in _TEXTS:
            ids = ours.encode(text)
            stream = ours.stream()
            pieces = [stream.push(i) for i in ids]
            assert "".join(pieces) + stream.finish() == ours.decode(ids) == text
            saw_partial |= any(p == "" for p in pieces)
        assert saw_partial  # some CJK/emoji characters are split over several byte tokens

        byte_level = _byte_tokenizer()
        ids = byte_level.encode("é🙂")
        assert ids == list("é🙂".encode())
        stream = byte_level.stream()
        assert [stream.push(i) for i in ids] == ["", "é", "", "", "", "🙂"]
        stream = byte_level.stream(skip_special_tokens=True)
        assert [stream.push(i) for i in [0xC3, 511, 0xA9]] == ["", "", "é"]
        stream = byte_level.stream()
        assert stream.push(0xF0) == "" and stream.finish() == "\ufffd" == byte_level.decode([0xF0])

    def test_byte_tokens_and_unknown_ids(self):
        tokenizer = _byte_tokenizer()
        text = "héllo\n  wörld 中 <|endoftext|>"
        ids = tokenizer.encode(text)
        assert ids == list("héllo\n  wörld 中 ".encode()) + [511]
        assert tokenizer.decode(ids) == text and tokenizer.decode(ids, skip_special_tokens=True) == text[:-13]
        with pytest.raises(ValueError, match="token id 600 is not in the vocabulary"):
            tokenizer.decode([65, 600])

    def test_merges_out_of_id_order_are_rejected(self, gpt2_style, tmp_path):
        _, path = gpt2_style
        spec = json.loads(open(os.path.join(path, "tokenizer.json"), encoding="utf-8").read())
        merges = spec["model"]["merges"]
        merges[10], merges[11] = merges[11], merges[10]  # tiktoken's ranks would no longer follow HF's merges
        (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
        with pytest.raises(ValueError, match="merge 11 .* out of merge order"):
            load_tokenizer(str(tmp_path))

    @pytest.mark.parametrize("merges, extra, ignore_merges, text, hf_ids, tiktoken_ids, message", [
        # the issue's: "bc" = 256, "ab" = 257, "abc" = 258; HF never joins "a" + "bc", tiktoken would
        ([("b", "c"), ("a", "b"), ("ab", "c")], {}, False, "abc", [97, 256], [258], "'abc' .*: tiktoken builds "
         "it from 'a' \\+ 'bc'"),
        ([("b", "c"), ("a", "b"), ("ab", "c")], {}, True, "abca", [97, 256, 97], [258, 97], "'abc' .* 'a' \\+ 'bc'"),
        ([("a", "b")], {"abc": 257}, True, "abca", [256, 99, 97], [257, 97], "'abc' .* from 'ab' \\+ 'c'"),
        ([], {"abc": 256}, False, "abc", [97, 98, 99], [256], "'abc' \\(id 256\\): the merges never build it"),
        ([], {"abc": 256}, True, "abc abcabc", [256, 32, 97, 98, 99, 97, 98, 99], None, None),  # as a whole piece only
    ])
    def test_merges_tiktoken_would_apply_otherwise_are_refused(self, tmp_path, merges, extra, ignore_merges, text,
                                                                 hf_ids, tiktoken_ids, message):
        vocab = _byte_level_vocab(merges, extra)
        assert _bpe_tokenizer(tmp_path, vocab, merges, ignore_merges).encode(text).ids == hf_ids
        alphabet = model._byte_level_alphabet()
        ranks = {bytes(alphabet[char] for char in token): i for token, i in vocab.items()}
        plain = tiktoken.Encoding("plain", pat_str=model.GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
        assert plain.encode(text) == (tiktoken_ids or hf_ids)  # what the loader would give without its check
        if message is None:
            assert load_tokenizer(str(tmp_path)).encode(text) == hf_ids
        else:
            with pytest.raises(ValueError, match="tokenizer.json: .*" + message):
                load_tokenizer(str(tmp_path))

    def test_random_vocabularies_that_load_encode_as_hf(self, tmp_path):
        """BPE vocabularies trained by HF (all must load) or made of random merges (loaded or refused), with their
        merges as made or every split of each token merged (Llama 3's): each that loads encodes texts as HF does."""
        from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers
        rng, outcomes = random.Random(0), Counter()
        for trial in range(160):
            letters = "abcd"[:rng.randint(2, 4)]
            words = lambda n: ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(n)]
            trained = trial % 2 == 0
            if trained:
                trainer = HFTokenizer(models.BPE())
                trainer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                trainer.train_from_iterator(words(rng.randint(5, 60)), trainers.BpeTrainer(
                    vocab_size=256 + rng.randint(3, 40), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                    show_progress=False))
                saved = json.loads(trainer.to_str())["model"]
                vocab, merges = saved["vocab"], [tuple(merge) for merge in saved["merges"]]
            else:
                merges, tokens = [], list(letters)
                for _ in range(rng.randint(3, 30)):
                    left, right = rng.choice(tokens), rng.choice(tokens)
                    if left + right not in tokens and len(left + right) < 10:
                        merges.append((left, right))
                        tokens.append(left + right)
                vocab = _byte_level_vocab(merges)
            if rng.random() < 0.5:
                merges = _every_split_merged(vocab)
            ignore_merges = rng.random() < 0.5
            hf = _bpe_tokenizer(tmp_path, vocab, merges, ignore_merges)
            try:
                ours = load_tokenizer(str(tmp_path))
            except ValueError as e:
                assert not trained, e
                outcomes["refused"] += 1
                continue
            outcomes["loaded"] += 1
            texts = [" ".join(words(rng.randint(1, 3))) for _ in range(40)] + [t for t in vocab if len(t) > 1]
            for text in texts:
                assert ours.encode(text) == hf.encode(text).ids, (text, merges, ignore_merges)
        assert outcomes["refused"] > 10 and outcomes["loaded"] > 100, outcomes

    def test_unsupported_tokenizers(self, tmp_path):
        from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
        wordpiece = HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
        wordpiece.save(str(tmp_path / "tokenizer.json"))
        with pytest.raises(ValueError, match="model type 'WordPiece' is not supported"):
            load_tokenizer(str(tmp_path))
        sentencepiece_bpe = HFTokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
        sentencepiece_bpe.pre_tokenizer = pre_tokenizers.Metaspace()
        sentencepiece_bpe.save(str(tmp_path / "tokenizer.json"))
        with pytest.raises(ValueError, match=r"BPE without a ByteLevel pre-tokenizer \(pre-tokenizer \['Metaspace'\]"):
            load_tokenizer(str(tmp_path))
        os.remove(tmp_path / "tokenizer.json")
        with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
            load_tokenizer(str(tmp_path))


# ==== kv_cache.py =================================================================================

# A fake KV: each slot holds the digest of the prefix its writer computed.
_MOD = (1 << 61) - 1


def _digest(previous: int, token: int) -> int:
    return (previous * 1_000_003 + token + 1) % _MOD


def _prefix_digest(tokens) -> int:
    d = 0
    for t in tokens:
        d = _digest(d, t)
    return d


def _free_blocks(kv):
    """The free queue, evicted first to last."""
    return list(kv.free_queue.values())


def _snapshot(kv):
    return ([b.block_id for b in _free_blocks(kv)], [(b.ref_count, b.block_hash) for b in kv.blocks],
            dict(kv.cached_blocks), kv.num_query_tokens, kv.num_hit_tokens)


def _check_pool(kv, tables_with_tokens):
    """The DESIGN.md invariants: free = ref 0 and queued exactly once; owned = ref count equal to
    the tables holding it; hashes consistent with tokens."""
    queue = [block_id for block_id, block in kv.free_queue.items() if block.block_id == block_id]
    assert len(queue) == len(set(queue)) == len(kv.free_queue)
    holders = {}
    for table, _ in tables_with_tokens:
        assert len(table.block_ids) == len(set(table.block_ids))
        for block_id in table.block_ids:
            holders[block_id] = holders.get(block_id, 0) + 1
    for block in kv.blocks:
        assert (block.ref_count == 0) == (block.block_id in set(queue))
        assert block.ref_count == holders.get(block.block_id, 0)
        if block.block_hash is not None:
            assert kv.cached_blocks[block.block_hash] is block
            assert hash_block(block.parent_hash, block.token_ids) == block.block_hash
    assert all(b.block_hash == h for h, b in kv.cached_blocks.items())
    size = kv.block_size
    for table, tokens in tables_with_tokens:
        parent = ROOT_HASH
        for i, block_hash in enumerate(table.block_hashes):
            assert block_hash == hash_block(parent, tokens[i * size:(i + 1) * size])
            parent = block_hash
        for i in range(table.num_registered_blocks):
            block = kv.blocks[table.block_ids[i]]
            if block.block_hash is not None:
                assert block.token_ids == tuple(tokens[i * size:(i + 1) * size])


class TestKVCache:
    """kv_cache.py: block pool and prefix cache against their invariants and a fake KV per slot; sizing."""

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(1, 12),
           prompts=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=12), min_size=1, max_size=5),
           ops=st.lists(st.tuples(st.sampled_from(["admit", "compute", "append", "finish", "preempt"]),
                                  st.integers(0, 4), st.integers(1, 6)), max_size=50))
    def test_block_pool_invariants_under_random_operations(self, block_size, num_blocks, prompts, ops):
        """Random admit / compute / append / finish / preempt over prompts from a 3-token alphabet (so
        prefixes are shared often). A fake KV per slot (the digest of the prefix its writer computed)
        shows that every computed position of every live request still reads its own prefix."""
        kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=True)
        slots, live, parked = {}, {}, {}  # live/parked: index -> [tokens, table, num_computed]

        def compute(state, num_tokens):
            tokens, table, start = state
            if not kv.allocate(table, tokens, num_tokens):
                return
            for p in range(start, num_tokens):
                slots[table.block_ids[p // block_size] * block_size + p % block_size] = _prefix_digest(tokens[:p + 1])
            state[2] = num_tokens

        for op, which, n in ops:
            i = which % len(prompts)
            state = live.get(i)
            if op == "admit" and state is None:
                tokens, table, _ = parked.pop(i, None) or [list(prompts[i]), BlockTable(), 0]
                hits = kv.lookup(table, tokens)
                assert len(hits) * block_size < len(tokens)  # at least one token left to compute
                num_tokens = len(hits) * block_size + min(n, len(tokens) - len(hits) * block_size)
                before = _snapshot(kv)
                if kv.allocate(table, tokens, num_tokens, hits):
                    state = live[i] = [tokens, table, len(hits) * block_size]
                    compute(state, num_tokens)
                else:
                    assert _snapshot(kv) == before and table.block_ids == []
                    parked[i] = [tokens, table, 0]
            elif op == "compute" and state is not None and state[2] < len(state[0]):
                compute(state, state[2] + min(n, len(state[0]) - state[2]))
            elif op == "append" and state is not None and state[2] == len(state[0]):
                state[0].append(n % 3)
            elif op in ("finish", "preempt") and state is not None:
                kv.free(state[1])
                del live[i]
                if op == "preempt":
                    parked[i] = [state[0], state[1], 0]
            _check_pool(kv, [(s[1], s[0]) for s in live.values()])
            for tokens, table, num_computed in live.values():
                for p in range(num_computed):
                    slot = table.block_ids[p // block_size] * block_size + p % block_size
                    assert slots[slot] == _prefix_digest(tokens[:p + 1])
        for tokens, table, _ in list(live.values()):
            kv.free(table)
        _check_pool(kv, [])
        assert len(kv.free_queue) == num_blocks

    def test_lru_evicts_least_recently_freed_and_a_requests_tail_first(self):
        kv = KVCacheManager(num_blocks=6, block_size=2)
        a_tokens, b_tokens = [1, 2, 3, 4, 5], [6, 7, 8, 9, 5]
        a, b = BlockTable(), BlockTable()
        assert kv.allocate(a, a_tokens, 5) and kv.allocate(b, b_tokens, 5)  # 3 blocks each, 2 full
        a_ids, b_ids = list(a.block_ids), list(b.block_ids)
        kv.free(a)
        kv.free(b)
        assert [blk.block_id for blk in _free_blocks(kv)] == a_ids[::-1] + b_ids[::-1]
        c = BlockTable()
        assert kv.allocate(c, [0] * 4, 4)
        assert c.block_ids == [a_ids[2], a_ids[1]]  # a's partial tail block, then its second block
        assert len(kv.lookup(BlockTable(), a_tokens)) == 1  # a's first block is still cached
        assert len(kv.lookup(BlockTable(), b_tokens)) == 2
        assert kv.allocate(c, [0] * 8, 8)
        assert c.block_ids[2:] == [a_ids[0], b_ids[2]]
        assert kv.lookup(BlockTable(), a_tokens) == [] and len(kv.lookup(BlockTable(), b_tokens)) == 2

    def test_a_hit_pulls_a_free_block_out_of_the_queue(self):
        kv = KVCacheManager(num_blocks=4, block_size=2)
        a = BlockTable()
        assert kv.allocate(a, [1, 2, 3], 3)
        first = a.block_ids[0]
        kv.free(a)
        b = BlockTable()
        hits = kv.lookup(b, [1, 2, 9])
        assert [h.block_id for h in hits] == [first]
        assert kv.allocate(b, [1, 2, 9], 3, hits)
        assert first not in [blk.block_id for blk in _free_blocks(kv)] and kv.blocks[first].ref_count == 1
        assert len(kv.free_queue) == 2
        assert not kv.allocate(BlockTable(), [5] * 5, 5) and kv.allocate(BlockTable(), [5] * 4, 4)  # 2 free blocks
        kv.free(b)  # b's tail block, then `first`, back in the free queue
        assert kv.allocate(BlockTable(), [8], 1) and list(kv.free_queue) == [first]
        # Reviving a free hit costs its free block: the hit and one new block do not fit in one (no change).
        hits = kv.lookup(BlockTable(), [1, 2, 9])
        assert not kv.allocate(BlockTable(), [1, 2, 9], 3, hits) and list(kv.free_queue) == [first]
        assert kv.allocate(BlockTable(), [1, 2, 9], 2, hits) and not kv.free_queue

    def test_forced_hash_collision_is_a_miss(self, monkeypatch):
        monkeypatch.setattr(kv_cache, "hash_block", lambda parent_hash, token_ids: b"collision")
        kv = KVCacheManager(num_blocks=8, block_size=2)
        a = BlockTable()
        assert kv.allocate(a, [1, 2, 3, 4, 9], 5)
        kv.free(a)
        assert kv.lookup(BlockTable(), [3, 4, 1, 2, 9]) == []  # same hash, other tokens
        assert len(kv.lookup(BlockTable(), [1, 2, 1, 2, 9])) == 1  # same tokens, other parent
        assert len(kv.lookup(BlockTable(), [1, 2, 3, 4, 9])) == 1  # only one block per hash value

    def test_same_prefix_hits_with_the_real_hash(self):
        kv = KVCacheManager(num_blocks=8, block_size=2)
        a = BlockTable()
        assert kv.allocate(a, [1, 2, 3, 4, 9], 5)
        assert [h.block_id for h in kv.lookup(BlockTable(), [1, 2, 3, 4, 7, 7])] == a.block_ids[:2]
        assert [h.block_id for h in kv.lookup(BlockTable(), [1, 2, 3, 4])] == a.block_ids[:1]  # capped
        assert kv.lookup(BlockTable(), [3, 4, 1, 2, 9]) == []

    def test_prefix_caching_off_hashes_nothing(self):
        kv = KVCacheManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
        a, b = BlockTable(), BlockTable()
        assert kv.allocate(a, [1, 2, 3, 4, 9], 5)
        assert kv.lookup(b, [1, 2, 3, 4, 9]) == [] and b.block_hashes == [] and a.block_hashes == []
        assert kv.cached_blocks == {} and all(blk.block_hash is None for blk in kv.blocks)

    def test_kv_tensor_layout_and_bytes_per_block(self):
        kv = allocate_kv_cache(num_layers=3, num_blocks=5, block_size=4, num_kv_heads=2, head_dim=8,
                               dtype=torch.float16, device="cpu")
        assert kv.shape == (3, 2, 5, 4, 2, 8) and kv.dtype == torch.float16 and not kv.any()
        assert kv_cache_bytes_per_block(3, 4, 2, 8, torch.float16) * 5 == kv.numel() * kv.element_size()
        assert kv_cache_bytes_per_block(28, 16, 8, 128, torch.bfloat16) == 28 * 2 * 16 * 8 * 128 * 2

    def test_num_blocks_from_memory(self, monkeypatch):
        gib = 1 << 30
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * gib, 100 * gib))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 * gib)
        # in use at the peak: 25 GiB torch + (40 - 30) GiB outside torch; budget 90 - 35 = 55 GiB
        assert num_blocks_from_memory(gib // 4, 0.9, 25 * gib, "cuda") == 220
        assert num_blocks_from_memory(gib // 4, 0.3, 25 * gib, "cuda") == 0

    def test_check_kv_capacity_names_the_knobs(self):
        check_kv_capacity(num_blocks=4, block_size=16, max_model_len=64)
        with pytest.raises(ValueError, match="gpu_memory_utilization.*max_model_len.*max_num_batched_tokens"):
            check_kv_capacity(num_blocks=4, block_size=16, max_model_len=65)


# ==== scheduler.py ================================================================================

_VOCAB = 50
_EOS = 0


def _next_token(digest: int, vocab: int = _VOCAB) -> int:
    return (digest * 31 >> 5) % vocab


def _reference(prompt, params, max_model_len, eos=(_EOS,)):
    """The request run alone, straight from the definition: (output tokens, finish reason)."""
    digest, out = _prefix_digest(prompt), []
    while True:
        token = _next_token(digest)
        out.append(token)
        if (token in eos and not params.ignore_eos) or token in params.stop_token_ids:
            return out, "stop"
        if len(out) >= params.max_tokens or len(prompt) + len(out) >= max_model_len:
            return out, "length"
        digest = _digest(digest, token)


class _InjectedFailure(Exception):
    pass


class _FakeEngine:
    """Drives a Scheduler like engine.py: schedule, run the fake model, update; with async overlap,
    step N+1 is scheduled and run before step N's tokens are given to update()."""

    def __init__(self, scheduler, async_overlap=False, check_pool=False):
        self.scheduler, self.async_overlap, self.check_pool = scheduler, async_overlap, check_pool
        self.kv = {}              # slot -> fake KV; stale values stay, as on a GPU
        self.last_sampled = {}    # request -> token sampled in the previous step ("on the GPU")
        self.in_flight = None     # (output, tokens) not yet given to update()
        self.errors = []          # requests reported in output.finished
        self.num_sampled = {}     # request_id -> tokens sampled for it, discarded ones included
        self.num_steps = 0

    def step(self, failure=None):
        """One step; failure = ("model", k) raises after the fake model wrote k slots, ("update",)
        instead of handing tokens to update(). Then, like the engine, the steps in flight are
        dropped and the scheduler recovers."""
        s = self.scheduler
        running_before, num_preemptions_before = set(s.running), s.num_preemptions
        output = s.schedule()
        if s.num_preemptions > num_preemptions_before:  # no admissions in a step that preempts
            assert all(entry.request in running_before for entry in output.scheduled)
        if self.check_pool:
            _check_pool(s.kv_cache_manager, [(r.block_table, r.all_token_ids) for r in s.running])
        assert sum(x.num_new_tokens for x in output.scheduled) <= s.max_num_batched_tokens
        assert len(output.scheduled) <= s.max_num_seqs
        self.errors += output.finished
        self.num_steps += 1
        try:
            tokens = self._run_model(output, failure[1] if failure and failure[0] == "model" else None)
            if failure and failure[0] == "update":
                raise _InjectedFailure
            if self.in_flight is not None:
                s.update(*self.in_flight)
            self.in_flight = (output, tokens)
            if not self.async_overlap:
                self.finish_in_flight()
        except _InjectedFailure:
            self.in_flight, self.last_sampled = None, {}
            s.recover()
        return output

    def finish_in_flight(self):
        if self.in_flight is not None:
            self.scheduler.update(*self.in_flight)
            self.in_flight = None

    def run(self, max_steps=5000):
        while self.scheduler.has_unfinished_requests():
            self.step()
            assert self.num_steps < max_steps, "the scheduler made no progress"
        self.finish_in_flight()

    def _run_model(self, output, fail_after=None):
        s = self.scheduler
        block_size = s.kv_cache_manager.block_size
        sampled, tokens, self.written = {}, {}, []
        for entry in output.scheduled:
            request, table = entry.request, entry.request.block_ids
            assert entry.num_new_tokens >= 1
            assert entry.start + entry.num_new_tokens < s.max_model_len  # incl. a sampled token's position
            if s.long_prefill_token_threshold:
                assert entry.num_new_tokens <= s.long_prefill_token_threshold
            digest = 0
            for p in range(entry.start, entry.start + entry.num_new_tokens):
                if p < request.num_tokens:
                    token = request.all_token_ids[p]
                else:  # the placeholder: at most one token is unknown, the last step's
                    assert p == request.num_tokens and request in self.last_sampled
                    token = self.last_sampled[request]
                if p > 0:  # attention reads the context through the block table
                    digest = self.kv[table[(p - 1) // block_size] * block_size + (p - 1) % block_size]
                if fail_after is not None and len(self.written) >= fail_after:
                    raise _InjectedFailure
                digest = _digest(digest, token)
                self.kv[table[p // block_size] * block_size + p % block_size] = digest
                self.written.append(p)
            if entry.samples_token:
                token = _next_token(digest)
                sampled[request], tokens[request] = token, [token]
                self.num_sampled[request.request_id] = self.num_sampled.get(request.request_id, 0) + 1
        self.last_sampled = sampled
        return tokens


def _make_scheduler(num_blocks, block_size, budget=64, max_num_seqs=8, max_model_len=40,
                    prefix_caching=True, threshold=0, parity_context=None):
    config = EngineConfig(block_size=block_size, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                          max_model_len=max_model_len, enable_prefix_caching=prefix_caching,
                          long_prefill_token_threshold=threshold, budget_counts_attention=parity_context is not None)
    return Scheduler(config, num_blocks, _VOCAB, [_EOS], parity_context)


def _make_requests(seed, num_requests=8, max_prompt=24):
    """Prompts that share prefixes often (and one exact duplicate), mixed stop conditions."""
    rng = random.Random(seed)
    base = [rng.randrange(1, _VOCAB) for _ in range(max_prompt)]
    requests = []
    for i in range(num_requests):
        prompt = base[:rng.randrange(1, max_prompt - 6)] + [rng.randrange(_VOCAB) for _ in range(rng.randrange(0, 6))]
        if i == num_requests - 1:
            prompt = list(requests[0].prompt_token_ids)
        params = SamplingParams(max_tokens=rng.randrange(1, 16), ignore_eos=rng.random() < 0.3,
                                stop_token_ids=[rng.randrange(_VOCAB)] if rng.random() < 0.3 else None)
        requests.append(Request(f"r{i}", prompt, params))
    return requests


def _assert_no_blocks_held(scheduler):
    kv = scheduler.kv_cache_manager
    assert len(kv.free_queue) == kv.num_blocks
    assert all(block.ref_count == 0 for block in kv.blocks)
    assert not scheduler.requests and not scheduler.running and not scheduler.waiting


def _assert_matches_reference(requests, max_model_len):
    for r in requests:
        expected, reason = _reference(r.prompt_token_ids, r.sampling_params, max_model_len)
        assert (r.output_token_ids, r.finish_reason) == (expected, reason), r.request_id
        assert r.num_output_placeholders == 0 or r.finish_reason is not None


def _poison_blocks_when_taken(kv, fake_kv):
    """Every block the pool hands out loses its old K/V, so a block no step wrote reads as None."""
    take = kv._take_free_block

    def take_and_poison():
        block = take()
        for slot in range(block.block_id * kv.block_size, (block.block_id + 1) * kv.block_size):
            fake_kv.pop(slot, None)
        return block
    kv._take_free_block = take_and_poison


class TestScheduler:
    """scheduler.py, driven by _FakeEngine: every request's tokens against the request run alone (_reference)."""

    @pytest.mark.parametrize("async_overlap", [False, True])
    @pytest.mark.parametrize("block_size", [1, 2, 4, 16])
    def test_outputs_do_not_depend_on_schedule(self, block_size, async_overlap):
        """Every budget, max_num_seqs, block size, prefix caching on/off, chunk threshold, a pool so
        small that preemption happens, sync or async: the same tokens as each request alone."""
        max_model_len = 30
        tiny_pool = math.ceil(max_model_len / block_size)  # just one max_model_len request
        num_preemptions, num_length_capped = {tiny_pool: 0, 400: 0}, 0
        for seed, budget, max_num_seqs, caching, num_blocks, threshold in [
                (seed, budget, seqs, caching, blocks, threshold)
                for seed in (0, 1, 2) for budget in (1, 3, 8, 64) for seqs in (1, 3, 8)
                for caching in (False, True) for blocks in (tiny_pool, 400) for threshold in (0, 5)]:
            scheduler = _make_scheduler(num_blocks, block_size, budget, max_num_seqs, max_model_len, caching, threshold)
            requests = _make_requests(seed)
            engine = _FakeEngine(scheduler, async_overlap, check_pool=num_blocks == tiny_pool)
            for r in requests:
                scheduler.add(r)
            engine.run()
            _assert_matches_reference(requests, max_model_len)
            num_length_capped += sum(r.num_tokens == max_model_len for r in requests)
            _assert_no_blocks_held(scheduler)
            assert not engine.errors
            num_preemptions[num_blocks] += scheduler.num_preemptions
        assert num_preemptions[tiny_pool] > 50  # the small pool really did preempt
        assert num_preemptions[400] == 0
        assert num_length_capped > 0  # some requests ran into max_model_len

    def test_a_budget_counting_attention_shrinks_chunks_as_context_grows(self):
        """budget_counts_attention: the same tokens as each request alone; every step's cost (a token at context L
        counts 1 + L/P) stays within the budget, but for the one token a request always gets; a long prompt's
        chunks shrink as its context grows."""
        for seed, budget, parity in [(seed, budget, parity) for seed in (0, 1) for budget in (3, 8, 20)
                                     for parity in (4, 16)]:
            scheduler = _make_scheduler(400, 4, budget, max_model_len=40, parity_context=parity)
            requests = _make_requests(seed)
            for r in requests:
                scheduler.add(r)
            schedule = scheduler.schedule

            def checked_schedule():
                output = schedule()
                costs = [s.num_new_tokens * (1 + (s.start + s.num_new_tokens / 2) / parity) for s in output.scheduled]
                assert sum(costs[:-1]) < budget and (sum(costs) <= budget or output.scheduled[-1].num_new_tokens == 1)
                return output
            scheduler.schedule = checked_schedule
            _FakeEngine(scheduler, async_overlap=True).run()
            _assert_matches_reference(requests, 40)
            _assert_no_blocks_held(scheduler)
        scheduler = _make_scheduler(400, 4, budget=16, max_model_len=80, parity_context=8)
        scheduler.add(Request("long", [t % _VOCAB for t in range(60)], SamplingParams(max_tokens=1)))
        chunks = []
        while scheduler.has_unfinished_requests():
            output = scheduler.schedule()
            chunks.append(output.scheduled[0].num_new_tokens)
            scheduler.update(output, {s.request: [1] for s in output.scheduled if s.samples_token})
        assert sum(chunks) == 60 and chunks == sorted(chunks, reverse=True) and chunks[0] > 2 * chunks[-1], chunks

    def test_outputs_survive_forced_hash_collisions(self, monkeypatch):
        """Every block hashes to the same value: the token and parent checks keep outputs right."""
        monkeypatch.setattr(kv_cache, "hash_block", lambda parent_hash, token_ids: b"collision")
        for block_size in (1, 2, 4):
            for async_overlap in (False, True):
                scheduler = _make_scheduler(math.ceil(40 / block_size) + 2, block_size, budget=7, max_num_seqs=4)
                requests = _make_requests(3)
                for r in requests:
                    scheduler.add(r)
                _FakeEngine(scheduler, async_overlap).run()
                _assert_matches_reference(requests, 40)
                _assert_no_blocks_held(scheduler)

    def test_async_eos_discards_the_extra_token(self):
        """With two steps in flight, a request that stopped on EOS ran one token too many; that token is
        dropped and the output equals the synchronous one."""
        prompt = next(p for p in ([s, 7] for s in range(1, 10_000))
                      if (lambda out, reason: reason == "stop" and len(out) >= 3)(*_reference(p, SamplingParams(max_tokens=100), 1000)))
        outputs = {}
        for async_overlap in (False, True):
            scheduler = _make_scheduler(100, 4, max_model_len=1000)
            request = Request("eos", prompt, SamplingParams(max_tokens=100))
            scheduler.add(request)
            engine = _FakeEngine(scheduler, async_overlap)
            engine.run()
            assert request.finish_reason == "stop" and request.output_token_ids[-1] == _EOS
            outputs[async_overlap] = (request.output_token_ids, engine.num_sampled["eos"])
            _assert_no_blocks_held(scheduler)
        (sync_out, sync_sampled), (async_out, async_sampled) = outputs[False], outputs[True]
        assert async_out == sync_out == _reference(prompt, SamplingParams(max_tokens=100), 1000)[0]
        assert sync_sampled == len(sync_out) and async_sampled == len(async_out) + 1

    def test_async_skips_requests_certain_to_finish(self):
        """A request whose last token (max_tokens) is in flight is not scheduled again."""
        scheduler = _make_scheduler(100, 4)
        request = Request("a", [5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True))
        scheduler.add(request)
        engine = _FakeEngine(scheduler, async_overlap=True)
        assert [e.num_new_tokens for e in engine.step().scheduled] == [3]
        assert [e.num_new_tokens for e in engine.step().scheduled] == [1]  # the placeholder token
        assert request.num_output_placeholders == 1  # step 1's token arrived, step 2's is in flight
        assert engine.step().scheduled == []          # 2 tokens already scheduled = max_tokens
        engine.run()
        assert request.output_token_ids == _reference([5, 6, 7], request.sampling_params, 40)[0]
        assert engine.num_sampled["a"] == 2

    def test_long_prompt_does_not_stall_running_decodes(self):
        budget, num_decodes, prompt_len = 40, 32, 100
        scheduler = _make_scheduler(2000, 4, budget=budget, max_num_seqs=64, max_model_len=1000)
        decodes = [Request(f"d{i}", [i + 1, 2, 3], SamplingParams(max_tokens=500, ignore_eos=True)) for i in range(num_decodes)]
        for r in decodes:
            scheduler.add(r)
        engine = _FakeEngine(scheduler)
        while not all(r.output_token_ids for r in decodes):
            engine.step()
        long_request = Request("long", [(7 * i) % _VOCAB for i in range(prompt_len)], SamplingParams(max_tokens=3))
        scheduler.add(long_request)
        num_steps = 0
        while not long_request.output_token_ids:
            entries = {e.request.request_id: e for e in engine.step().scheduled}
            num_steps += 1
            assert all(entries[r.request_id].num_new_tokens == 1 and entries[r.request_id].samples_token
                       for r in decodes)
            assert entries["long"].num_new_tokens == min(budget - num_decodes, prompt_len - entries["long"].start)
        assert num_steps == math.ceil(prompt_len / (budget - num_decodes))
        for r in decodes:
            scheduler.abort(r.request_id)
        engine.run()
        _assert_matches_reference([long_request], 1000)
        _assert_no_blocks_held(scheduler)

    def test_exact_multiple_prompt_fully_cached_still_computes_its_last_block(self):
        prompt = list(range(1, 9))  # two blocks of 4
        scheduler = _make_scheduler(20, 4)
        first, second = Request("first", prompt), Request("second", prompt)
        scheduler.add(first)
        engine = _FakeEngine(scheduler)
        engine.run()
        scheduler.add(second)
        [entry] = engine.step().scheduled
        assert (entry.start, entry.num_new_tokens, entry.samples_token) == (4, 4, True)
        assert second.num_cached_tokens == 4
        engine.run()
        _assert_matches_reference([first, second], 40)

    def test_same_prompt_twice_shares_full_blocks_and_counts_hits(self):
        prompt = [(3 * i + 1) % _VOCAB for i in range(40)]
        scheduler = _make_scheduler(100, 4, budget=100, max_model_len=100)
        a, b = Request("a", prompt), Request("b", prompt)
        scheduler.add(a)
        scheduler.add(b)
        engine = _FakeEngine(scheduler, async_overlap=True)
        engine.step()  # both admitted in one step: b hits the blocks a registered when allocating
        assert b.num_cached_tokens == 36  # 9 full blocks; the 10th holds the last token, computed again
        assert b.block_ids[:9] == a.block_ids[:9] and b.block_ids[9] != a.block_ids[9]
        kv = scheduler.kv_cache_manager
        assert kv.num_hit_tokens / kv.num_query_tokens == pytest.approx(36 / 80)
        engine.run()
        _assert_matches_reference([a, b], 100)
        c = Request("c", prompt + [1, 2, 3, 4, 5])  # after both finished: hits all 10 blocks
        scheduler.add(c)
        engine.run()
        assert c.num_cached_tokens == 40
        assert kv.num_hit_tokens / kv.num_query_tokens == pytest.approx((36 + 40) / (80 + 45))
        _assert_matches_reference([c], 100)
        _assert_no_blocks_held(scheduler)

    # ---- bad input, aborts, failed steps

    @pytest.mark.parametrize("async_overlap", [False, True])
    def test_bad_requests_fail_alone(self, async_overlap):
        scheduler = _make_scheduler(num_blocks=4, block_size=4, max_model_len=32)  # pool: 16 tokens
        good = [Request(f"g{i}", [i + 1, 9, 9], SamplingParams(max_tokens=8, ignore_eos=True)) for i in range(3)]
        for r in good:
            scheduler.add(r)
        bad_requests = [
            (Request("empty", []), "prompt_token_ids is empty"),
            (Request("long", [1] * 32), "max_model_len=32"),
            (Request("vocab", [1, _VOCAB]), "vocab_size=50"),
            (Request("negative", [-1, 2]), "vocab_size"),
            (Request("float", [1.0, 2]), "vocab_size"),
            (Request("pool", [1] * 17), "gpu_memory_utilization"),
            (Request("g0", [1, 2]), "already used"),
        ]
        for request, message in bad_requests:
            with pytest.raises(ValueError, match=message):
                scheduler.add(request)
        # Fits at admission, outgrows the whole pool while decoding: FINISHED_ERROR, reported once.
        grower = Request("grower", [4, 4, 4, 4, 4], SamplingParams(max_tokens=30, ignore_eos=True))
        scheduler.add(grower)
        engine = _FakeEngine(scheduler, async_overlap)
        engine.run()
        assert engine.errors == [grower] and grower.status is RequestStatus.FINISHED_ERROR
        assert grower.finish_reason == "error"
        assert "gpu_memory_utilization" in grower.error and "max_model_len" in grower.error
        # 16 slots hold 12 outputs' context; with overlap the 12th was in flight when it failed
        expected = _reference(grower.prompt_token_ids, grower.sampling_params, 32)[0][:11 if async_overlap else 12]
        assert grower.output_token_ids == expected
        _assert_matches_reference(good, 32)
        _assert_no_blocks_held(scheduler)

    def test_request_outgrowing_the_pool_alone_fails(self):
        scheduler = _make_scheduler(num_blocks=3, block_size=2, max_model_len=32)
        big = Request("big", [1, 2], SamplingParams(max_tokens=20, ignore_eos=True))
        scheduler.add(big)
        engine = _FakeEngine(scheduler)
        engine.run()
        assert engine.errors == [big] and "need 4 KV blocks" in big.error and "pool has 3" in big.error
        assert len(big.output_token_ids) == 5  # 6 slots: the 7th token's KV has no block
        _assert_no_blocks_held(scheduler)

    def test_preempted_request_that_can_no_longer_fit_fails_at_the_head_of_the_queue(self):
        """b shares a's blocks, is preempted by a, and has since grown past the pool: once a is done,
        b is alone at the head of the queue and still does not fit, so it fails instead of waiting."""
        scheduler = _make_scheduler(num_blocks=3, block_size=2, max_model_len=32)
        a = Request("a", [1, 2, 3, 4], SamplingParams(max_tokens=2, ignore_eos=True))
        b = Request("b", [1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=10, ignore_eos=True))
        c = Request("c", [7, 8], SamplingParams(max_tokens=2, ignore_eos=True))
        scheduler.add(a)
        scheduler.add(b)
        engine = _FakeEngine(scheduler)
        engine.step()  # both admitted, b on a's two blocks + one of its own
        assert b.num_cached_tokens == 4 and len(scheduler.kv_cache_manager.free_queue) == 0
        scheduler.add(c)
        engine.step()  # a needs a third block: b is preempted, back to the front of the queue
        assert b.status is RequestStatus.PREEMPTED and scheduler.num_preemptions == 1
        assert list(scheduler.waiting) == [b, c]
        engine.run()
        assert engine.errors == [b] and "7 tokens need 4 KV blocks" in b.error
        _assert_matches_reference([a, c], 32)
        _assert_no_blocks_held(scheduler)

    @pytest.mark.parametrize("async_overlap", [False, True])
    def test_aborts_at_random_times_free_everything(self, async_overlap):
        rng = random.Random(5)
        for trial in range(20):
            scheduler = _make_scheduler(num_blocks=12, block_size=4, budget=rng.choice([3, 10]), max_num_seqs=5)
            requests = _make_requests(trial)
            for r in requests:
                scheduler.add(r)
            engine = _FakeEngine(scheduler, async_overlap)
            aborted = set()
            while scheduler.has_unfinished_requests():
                live = list(scheduler.requests)
                if rng.random() < 0.2:
                    victim = rng.choice(live)
                    assert scheduler.abort(victim).status is RequestStatus.FINISHED_ABORTED
                    aborted.add(victim)
                if scheduler.has_unfinished_requests():
                    engine.step()
            engine.finish_in_flight()
            _assert_no_blocks_held(scheduler)
            for r in requests:
                expected, reason = _reference(r.prompt_token_ids, r.sampling_params, 40)
                if r.request_id in aborted:
                    assert r.finish_reason == "abort" and r.output_token_ids == expected[:len(r.output_token_ids)]
                else:
                    assert (r.output_token_ids, r.finish_reason) == (expected, reason)
        with pytest.raises(KeyError, match="r0"):
            scheduler.abort("r0")

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(seed=st.integers(0, 10**6), block_size=st.sampled_from([1, 2, 4]), budget=st.sampled_from([3, 8, 64]),
           tiny_pool=st.booleans(), async_overlap=st.booleans(),
           failures=st.dictionaries(st.integers(0, 30), st.one_of(st.tuples(st.just("model"), st.integers(0, 40)),
                                                                    st.just(("update",))), max_size=4))
    def test_failed_steps_are_undone(self, seed, block_size, budget, tiny_pool, async_overlap, failures):
        """Any step may fail half-way through the model or before its tokens reach update(): after
        recover() every request still gets exactly the tokens it gets alone, nothing leaks, and the prefix
        cache holds only blocks whose KV a finished step wrote (checked slot by slot after every step)."""
        num_blocks = math.ceil(30 / block_size) if tiny_pool else 400  # tiny: one request at full length
        scheduler = _make_scheduler(num_blocks, block_size, budget, max_num_seqs=4, max_model_len=30)
        requests = _make_requests(seed)
        for r in requests:
            scheduler.add(r)
        engine, kv = _FakeEngine(scheduler, async_overlap), scheduler.kv_cache_manager
        _poison_blocks_when_taken(kv, engine.kv)
        prefix_of = {}  # block hash -> the tokens it stands for
        while scheduler.has_unfinished_requests():
            engine.step(failures.get(engine.num_steps))
            assert engine.num_steps < 500, "no progress"
            for r in requests:
                for i, block_hash in enumerate(r.block_table.block_hashes):
                    prefix_of[block_hash] = r.all_token_ids[:(i + 1) * block_size]
            for block_hash, block in kv.cached_blocks.items():
                tokens = prefix_of[block_hash]
                for offset in range(block_size):
                    position = len(tokens) - block_size + offset
                    assert engine.kv.get(block.block_id * block_size + offset) == _prefix_digest(tokens[:position + 1])
        engine.finish_in_flight()
        _assert_matches_reference(requests, 30)
        _assert_no_blocks_held(scheduler)

    @pytest.mark.parametrize("max_tokens", [3, 12])
    def test_recover_repairs_an_update_cut_off_half_way(self, max_tokens):
        """An interrupt inside update() may leave a token in output_token_ids only, and its stop not
        applied: recover() rebuilds the token list and finishes a request that is done."""
        scheduler = _make_scheduler(num_blocks=40, block_size=4)
        request = Request("r", [1, 2, 3, 4, 5], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        scheduler.add(request)
        engine = _FakeEngine(scheduler)
        for _ in range(2):
            engine.step()
        output, tokens = scheduler.schedule(), None  # a third step, whose update is cut off after one append
        tokens = engine._run_model(output)
        request.output_token_ids += tokens[request]
        scheduler.recover()
        assert request.all_token_ids == request.prompt_token_ids + request.output_token_ids
        assert request.status is (RequestStatus.FINISHED_LENGTH if max_tokens == 3 else RequestStatus.PREEMPTED)
        engine.run()
        _assert_matches_reference([request], 40)
        _assert_no_blocks_held(scheduler)

    def test_update_checks_the_number_of_sampled_tokens(self):
        scheduler = _make_scheduler(10, 4)
        scheduler.add(Request("a", [1, 2, 3]))
        output = scheduler.schedule()
        [entry] = output.scheduled
        with pytest.raises(ValueError, match="sampled_token_ids has 2 tokens.*1 request"):
            scheduler.update(output, {entry.request: [5], Request("b", [1]): [6]})
        with pytest.raises(ValueError, match="sampled_token_ids has 1 tokens.*each needs its own"):
            scheduler.update(output, {Request("a", [1, 2, 3]): [5]})  # the same id, another request

    @pytest.mark.parametrize("field,value", [
        ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
        ("top_k", -2), ("top_k", 1.5), ("max_tokens", 0), ("max_tokens", True), ("stop_token_ids", [1, "a"]),
        ("stop_token_ids", 3), ("seed", 1.5), ("ignore_eos", 1)])
    def test_sampling_params_validation_names_the_field(self, field, value):
        with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
            SamplingParams(**{field: value})


# ==== attention.py and the fused kernels ==========================================================

def _make_batch(query_lens, seq_lens, num_kv_heads, group, head_dim, block_size, dtype, seed,
                extra_blocks=3):
    """Random caches and metadata; each request's blocks are scattered over a shuffled pool."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(s + block_size - 1) // block_size for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    pool = torch.randperm(num_blocks, generator=gen)
    tables = [pool[used:used + n].tolist() for used, n in zip(itertools.accumulate([0, *blocks_per_seq]), blocks_per_seq)]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(sum(query_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    # a spare column: tables are wider than the longest request
    meta = AttentionMetadata.from_lengths(query_lens, seq_lens, tables, block_size, _DEVICE,
                                          width=max(blocks_per_seq + [1]) + 1)
    return q.to(_DEVICE), k_cache.to(_DEVICE), v_cache.to(_DEVICE), meta


def _check_attention(query_lens, seq_lens, num_kv_heads, group, head_dim, block_size, dtype, seed, config=None):
    q, k_cache, v_cache, meta = _make_batch(query_lens, seq_lens, num_kv_heads, group, head_dim, block_size,
                                            dtype, seed)
    scale = head_dim ** -0.5
    if config is None:
        out = paged_attention(q, k_cache, v_cache, meta, scale)
    else:
        out = paged_attention(q, k_cache, v_cache, meta, scale, config=config)
    ref = paged_attention_reference(q.double(), k_cache.double(), v_cache.double(), meta, scale)
    _assert_close(out, ref)
    return out

_SMALL = not _CUDA  # the interpreter runs every program in numpy: keep the CPU shapes tiny


def _fused_model(architecture, dtype):
    """A tiny random model with random norm weights and biases (random_model sets them to 1 and 0)."""
    config = SHAPES["tiny"]
    if architecture == "llama3":
        config = replace(config, architecture="LlamaForCausalLM", rope_theta=5e5, tie_word_embeddings=False,
                         rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 32))
    model = random_model(config, dtype=dtype, device=_DEVICE)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.copy_(1 + 0.3 * torch.randn(parameter.shape, generator=generator))
    return model


class TestAttention:
    """attention.py's kernels and the fused kernels against plain-torch references; the model with them vs without."""

    # ---- paged attention

    @pytest.mark.parametrize("dtype", _DTYPES)
    def test_one_token_prompt(self, dtype):
        _check_attention([1], [1], num_kv_heads=2, group=2, head_dim=32, block_size=16, dtype=dtype, seed=1)

    @pytest.mark.parametrize("dtype", _DTYPES)
    @pytest.mark.parametrize("group", [1, 2, 4, 8])
    def test_decode_batch_gqa(self, dtype, group):
        # Contexts that are exact multiples of the block size next to ones that are not.
        seq_lens = [16, 32, 7, 45] if _SMALL else [16, 512, 1000, 4096, 33, 2048]
        _check_attention([1] * len(seq_lens), seq_lens, num_kv_heads=2, group=group, head_dim=32 if _SMALL else 128,
                         block_size=16, dtype=dtype, seed=group)

    @pytest.mark.parametrize("dtype", _DTYPES)
    def test_mixed_decodes_and_chunks_with_prefix(self, dtype):
        # 1-token decodes, a fresh prompt, chunks continuing a cached prefix; tile boundaries fall
        # inside requests (BLOCK_Q = 128 // group query tokens by default).
        if _SMALL:
            query_lens, seq_lens = [1, 20, 1, 9, 70], [30, 20, 5, 40, 100]
        else:
            query_lens, seq_lens = [1, 700, 1, 64, 300, 1], [300, 700, 5000, 2100, 1200, 17]
        _check_attention(query_lens, seq_lens, num_kv_heads=2, group=2, head_dim=64, block_size=16, dtype=dtype, seed=3)

    @pytest.mark.parametrize("block_size", [1, 2, 16, 64])
    def test_block_sizes_and_scattered_blocks(self, block_size):
        # A long request over many non-contiguous blocks of a shuffled pool.
        seq_lens = [150, 3] if _SMALL else [3000, 3]
        _check_attention([1, 3], seq_lens, num_kv_heads=1, group=4, head_dim=16 if _SMALL else 128,
                         block_size=block_size, dtype=_DTYPES[0], seed=block_size)

    @pytest.mark.parametrize("head_dim", [16, 64, 256] if _SMALL else [64, 128, 256])
    def test_head_dims(self, head_dim):
        _check_attention([1, 5], [20, 37], num_kv_heads=1, group=2, head_dim=head_dim, block_size=8,
                         dtype=_DTYPES[1], seed=head_dim)

    @pytest.mark.parametrize("dtype", _DTYPES)
    @pytest.mark.parametrize("num_splits", [2, 4, 8])
    def test_split_kv_forced(self, dtype, num_splits):
        # More splits than some requests have key tiles: the empty splits must merge as neutral.
        seq_lens = [100, 16, 1, 49]
        config = LaunchConfig(block_m=16, block_n=16, num_splits=num_splits, num_warps=4, num_stages=2)
        _check_attention([1] * 4, seq_lens, num_kv_heads=2, group=4, head_dim=32, block_size=4, dtype=dtype,
                         seed=num_splits, config=config)

    def test_split_kv_with_prefill_chunks(self):
        config = LaunchConfig(block_m=16, block_n=16, num_splits=4, num_warps=4, num_stages=2)
        _check_attention([1, 12, 30], [60, 12, 90], num_kv_heads=2, group=2, head_dim=32, block_size=8,
                         dtype=_DTYPES[0], seed=9, config=config)

    def test_padding_requests_give_zeros(self):
        # CUDA-graph padding: requests with seq_len 0 own a row each and must come out as zeros.
        q, k_cache, v_cache, meta = _make_batch([1, 1, 1], [40, 1, 1], 2, 2, 32, 16, _DTYPES[0], seed=5)
        meta.seq_lens[1:] = 0
        meta.block_table[1:] = 0
        for config in (choose_launch_config(q, k_cache, meta), LaunchConfig(16, 16, 4, 4, 2)):
            out = paged_attention(q, k_cache, v_cache, meta, 0.1, config=config)
            assert torch.equal(out[1:], torch.zeros_like(out[1:]))
            _assert_close(out, paged_attention_reference(q, k_cache, v_cache, meta, 0.1))

    def test_decode_split_choice_uses_only_shapes(self):
        # The CUDA-graph rule: with max_query_len == 1 the launch must not depend on max_seq_len.
        q, k_cache, _, meta = _make_batch([1, 1], [1000, 3], 2, 2, 32, 16, _DTYPES[0], seed=6)
        first = choose_launch_config(q, k_cache, meta)
        meta.max_seq_len = 1
        assert choose_launch_config(q, k_cache, meta) == first
        assert first.num_splits > 1  # 4 programs for 2 x 2 heads: the split path is chosen

    def test_bad_input_raises(self):
        q, k_cache, v_cache, meta = _make_batch([1], [5], 1, 2, 32, 4, _DTYPES[0], seed=8)
        with pytest.raises(ValueError, match="head_dim"):
            paged_attention(q[..., :24], k_cache[..., :24], v_cache[..., :24], meta, 1.0)
        with pytest.raises(ValueError, match="dtype"):
            paged_attention(q.double(), k_cache, v_cache, meta, 1.0)
        with pytest.raises(ValueError, match="scale > 0"):  # the kernel masks before it scales
            paged_attention(q, k_cache, v_cache, meta, 0.0)

    @pytest.mark.skipif(not _CUDA, reason="CUDA graphs need a GPU")
    def test_decode_cuda_graph_replay_with_new_seq_lens(self):
        num_seqs, group, num_kv_heads, head_dim, block_size = 8, 2, 8, 128, 16
        q, k_cache, v_cache, meta = _make_batch([1] * num_seqs, [2000] * num_seqs, num_kv_heads, group, head_dim,
                                                block_size, torch.bfloat16, seed=10)
        scale = head_dim ** -0.5
        paged_attention(q, k_cache, v_cache, meta, scale)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = paged_attention(q, k_cache, v_cache, meta, scale)
        gen = torch.Generator().manual_seed(11)
        for _ in range(3):
            new_lens = torch.randint(0, 2000, (num_seqs,), generator=gen, dtype=torch.int32)
            meta.seq_lens.copy_(new_lens)
            shuffled = meta.block_table[torch.randperm(num_seqs, generator=gen)]
            meta.block_table.copy_(shuffled)
            q.copy_(torch.randn(q.shape, generator=gen).to(q.dtype))
            graph.replay()
            meta.max_seq_len = int(new_lens.max())
            _assert_close(out, paged_attention_reference(q.double(), k_cache.double(), v_cache.double(), meta, scale))

    @pytest.mark.skipif(not _CUDA, reason="large shapes only on the GPU")
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    @pytest.mark.parametrize("head_dim", [64, 128, 256])
    def test_large_mixed_batch_all_dtypes(self, dtype, head_dim):
        _check_attention([1] * 20 + [1500, 257], [900] * 20 + [3000, 257], num_kv_heads=4, group=4,
                         head_dim=head_dim, block_size=16, dtype=dtype, seed=head_dim)
        _check_attention([1] * 3, [8000, 1, 70], num_kv_heads=8, group=2, head_dim=head_dim, block_size=256,
                         dtype=dtype, seed=head_dim + 1)
        _check_attention([700, 300], [700, 1000], num_kv_heads=2, group=8, head_dim=head_dim, block_size=32,
                         dtype=dtype, seed=head_dim + 2)  # long chunks: the block_m 128 configuration

    # ---- fused kernels

    @pytest.mark.parametrize("dtype", _DTYPES)
    @pytest.mark.parametrize("num_tokens, num_kv_heads, group, head_dim, qk_norm, block_size", [
        (1, 2, 2, 64, True, 16),
        (7, 1, 4, 128, False, 4),
        (13, 3, 1, 64, True, 1),
        (5, 8, 2, 128, True, 16),
        (9, 2, 4, 64, False, 256),
    ])
    def test_rope_and_write_kv_matches_reference(self, dtype, num_tokens, num_kv_heads, group, head_dim, qk_norm,
                                                 block_size):
        num_q_heads = num_kv_heads * group
        width = (num_q_heads + 2 * num_kv_heads) * head_dim
        # qkv as the model would pass a view of a wider buffer: rows strided, elements contiguous
        qkv = (3 * _randn(num_tokens, width + 32, dtype=dtype, seed=1))[:, :width]
        config = replace(SHAPES["llama3-8b"], head_dim=head_dim, max_position_embeddings=300, dtype=dtype)
        cos_table, sin_table = rope_tables(config, _DEVICE)
        generator = torch.Generator().manual_seed(2)
        positions = torch.randint(0, 300, (num_tokens,), generator=generator).to(_DEVICE)
        num_blocks = -(-2 * num_tokens // block_size) + 1
        slot_mapping = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
        slot_mapping[1::3] = -1  # padding tokens: nothing written
        slot_mapping = slot_mapping.to(_DEVICE)
        q_norm = 1 + 0.3 * _randn(head_dim, dtype=dtype, seed=3) if qk_norm else None
        k_norm = 1 + 0.3 * _randn(head_dim, dtype=dtype, seed=4) if qk_norm else None
        caches = [_randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, seed=s) for s in (5, 6)]
        expected_caches = [c.double() for c in caches]

        q = rope_and_write_kv(qkv, positions, cos_table, sin_table, q_norm, k_norm, 1e-6, *caches, slot_mapping)
        expected_q = rope_and_write_kv_reference(
            qkv.double(), positions, cos_table.double(), sin_table.double(),
            None if q_norm is None else q_norm.double(), None if k_norm is None else k_norm.double(), 1e-6,
            *expected_caches, slot_mapping)

        assert q.shape == (num_tokens, num_q_heads, head_dim) and q.is_contiguous()
        _assert_close(q, expected_q, elementwise=True)
        # untouched slots are equal exactly, as both start equal
        _assert_close(caches[0], expected_caches[0], elementwise=True)
        assert torch.equal(caches[1], expected_caches[1].to(dtype))  # v is copied, not computed

    def test_rope_and_write_kv_without_norm_is_plain_rotation(self):
        """An independent check of the reference: RoPE as a complex rotation of pairs (i, i + head_dim/2)."""
        num_tokens, num_kv_heads, head_dim = 4, 1, 64
        qkv = _randn(num_tokens, 3 * num_kv_heads * head_dim, dtype=torch.float32, seed=7)
        config = replace(SHAPES["tiny"], head_dim=head_dim, max_position_embeddings=64, dtype=torch.float32)
        cos_table, sin_table = rope_tables(config, _DEVICE)
        positions = torch.tensor([0, 3, 17, 63], device=_DEVICE)
        caches = [torch.zeros(1, num_tokens, num_kv_heads, head_dim, device=_DEVICE) for _ in range(2)]
        slots = torch.arange(num_tokens, device=_DEVICE)
        q = rope_and_write_kv(qkv, positions, cos_table, sin_table, None, None, 0.0, *caches, slots)
        pairs = torch.complex(qkv[:, :head_dim // 2], qkv[:, head_dim // 2: head_dim])
        inv_freq = 1e4 ** -(torch.arange(0, head_dim, 2, device=_DEVICE) / head_dim)
        rotated = pairs * torch.polar(torch.ones_like(inv_freq), positions[:, None] * inv_freq)
        torch.testing.assert_close(q[:, 0], torch.cat((rotated.real, rotated.imag), -1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(caches[1][0], qkv[:, 2 * head_dim:].view(num_tokens, 1, head_dim))

    @pytest.mark.parametrize("dtype", _DTYPES)
    @pytest.mark.parametrize("num_tokens, hidden", [(1, 64), (7, 96), (33, 1024)])
    def test_add_rms_norm_matches_reference(self, dtype, num_tokens, hidden):
        x = _randn(num_tokens, hidden + 8, dtype=dtype, seed=1)[:, :hidden]  # strided rows
        residual = _randn(num_tokens, hidden, dtype=dtype, seed=2)
        weight = 1 + 0.3 * _randn(hidden, dtype=dtype, seed=3)
        expected_residual = residual.clone()
        out = add_rms_norm(x, residual, weight, 1e-6)
        expected = add_rms_norm_reference(x, expected_residual, weight, 1e-6)
        assert torch.equal(residual, expected_residual)  # the in-place sum, rounded as torch rounds it
        _assert_close(out, expected, elementwise=True)
        if dtype == torch.float32:  # and torch's own RMSNorm, an independent reference
            torch.testing.assert_close(out, F.rms_norm(residual, (hidden,), weight, 1e-6), rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("dtype", _DTYPES)
    @pytest.mark.parametrize("num_tokens, intermediate", [(1, 96), (5, 1064)])  # 1064: two programs, the second partial
    def test_silu_and_mul_matches_reference(self, dtype, num_tokens, intermediate):
        gate_up = (4 * _randn(num_tokens, 2 * intermediate + 16, dtype=dtype, seed=1))[:, :2 * intermediate]
        out = silu_and_mul(gate_up)
        _assert_close(out, silu_and_mul_reference(gate_up), elementwise=True)
        gate, up = gate_up.double().chunk(2, dim=-1)  # the definition: gate * sigmoid(gate) * up
        _assert_close(out, gate * torch.sigmoid(gate) * up, elementwise=True)

    def test_fused_kernels_reject_bad_input(self):
        x = _randn(3, 64, dtype=torch.float32, seed=0)
        with pytest.raises(ValueError, match="residual"):
            add_rms_norm(x, x[:2], x[0], 1e-6)
        with pytest.raises(ValueError, match="gate_up"):
            silu_and_mul(x[:, :63])
        caches = [torch.zeros(2, 4, 1, 16, device=_DEVICE) for _ in range(2)]
        tables = torch.zeros(8, 16, device=_DEVICE)
        positions = slots = torch.zeros(3, dtype=torch.int64, device=_DEVICE)
        with pytest.raises(ValueError, match="qkv"):
            rope_and_write_kv(x[:, :40], positions, tables, tables, None, None, 0.0, *caches, slots)
        with pytest.raises(ValueError, match="q_norm and k_norm"):
            rope_and_write_kv(x, positions, tables, tables, tables[0], None, 0.0, *caches, slots)
        with pytest.raises(ValueError, match="slot_mapping"):
            rope_and_write_kv(x, positions, tables, tables, None, None, 0.0, *caches, slots[:2])

    # ---- fp8 KV cache: the kernels against the references that quantize and dequantize with the same scales

    @pytest.mark.parametrize("query_lens, seq_lens, config", [
        ([1] * 4, [100, 16, 1, 49], None),
        ([1] * 4, [100, 16, 1, 49], LaunchConfig(block_m=16, block_n=16, num_splits=4, num_warps=4, num_stages=2)),
        ([1, 12, 30], [60, 12, 90], None)], ids=["decode", "decode-split", "mixed"])
    def test_fp8_attention_dequantizes_with_the_scales(self, query_lens, seq_lens, config):
        q, k_cache, v_cache, meta = _make_batch(query_lens, seq_lens, 2, 2, 32, 8, _DTYPES[0], seed=12)
        kv_scale = torch.tensor([0.02, 0.05], device=_DEVICE)
        k8, v8 = (attention.to_cache(c, scale, FP8) for c, scale in zip((k_cache, 10 * v_cache), kv_scale))
        out = paged_attention(q, k8, v8, meta, 0.3, kv_scale, config=config)
        # independent of the fp8 path: plain attention over the dequantized values, in fp64
        ref = paged_attention_reference(q.double(), k8.double() * 0.02, v8.double() * 0.05, meta, 0.3)
        _assert_close(out, ref)
        _assert_close(paged_attention_reference(q, k8, v8, meta, 0.3, kv_scale), ref)
        with pytest.raises(ValueError, match="kv_scale"):
            paged_attention(q, k8, v8, meta, 0.3)

    @pytest.mark.parametrize("dtype", _DTYPES)
    def test_fp8_write_quantizes_and_saturates_like_the_reference(self, dtype):
        num_tokens, num_kv_heads, head_dim, block_size = 11, 2, 64, 4
        qkv = 4 * _randn(num_tokens, 4 * num_kv_heads * head_dim, dtype=dtype, seed=1)  # 2 q heads per KV head
        config = replace(SHAPES["tiny"], head_dim=head_dim, max_position_embeddings=64, dtype=dtype)
        cos_table, sin_table = rope_tables(config, _DEVICE)
        positions = torch.arange(num_tokens, device=_DEVICE) * 5
        slot_mapping = torch.randperm(4 * block_size, generator=torch.Generator().manual_seed(2))[:num_tokens]
        slot_mapping[3] = -1
        slot_mapping = slot_mapping.to(_DEVICE)
        kv_scale = torch.tensor([0.01, 0.02], device=_DEVICE)  # |k| up to ~15 / 0.01: some saturate
        caches = [torch.zeros(4, block_size, num_kv_heads, head_dim, dtype=FP8, device=_DEVICE) for _ in range(2)]
        expected = [c.clone() for c in caches]
        q = rope_and_write_kv(qkv, positions, cos_table, sin_table, None, None, 1e-6, *caches, slot_mapping, kv_scale)
        expected_q = rope_and_write_kv_reference(qkv.float(), positions, cos_table.float(), sin_table.float(), None,
                                                 None, 1e-6, *expected, slot_mapping, kv_scale)
        _assert_close(q, expected_q, elementwise=True)
        for cache, reference in zip(caches, expected):
            got, want = cache.float(), reference.float()
            if not _CUDA:  # Triton 3.9's interpreter drops the carry when fp32 -> e4m3 rounds up to a power of two
                got = torch.where(got * 2 == want, want, got)  # (2^e comes out as 2^(e-1); GPUs convert exactly)
            # fp8 keeps 3 mantissa bits: one rounding step apart at most where fp32 math rounds differently
            torch.testing.assert_close(got, want, rtol=0.13, atol=2 ** -9)
            assert (got == want).float().mean() > 0.97
            assert got.abs().max() == attention.FP8_MAX and not got.isnan().any()  # saturated, not NaN
        written = torch.zeros(4 * block_size, dtype=torch.bool)
        written[slot_mapping[slot_mapping >= 0].cpu()] = True
        assert not caches[1].view(4 * block_size, -1)[~written.to(_DEVICE)].float().any()

    # ---- the whole model

    @pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if _CUDA else []))
    @pytest.mark.parametrize("architecture", ["qwen3", "llama3"])
    def test_fused_forward_matches_torch_forward(self, architecture, dtype):
        """Prefills, then a mixed step (a prompt chunk on a cached prefix + decodes), each forward
        writing its own cache. In fp32 the Triton forward's logits and cache equal the torch forward's
        to 1e-4; in bf16, where the two round at different points, the Triton forward must be about as
        close to the fp32 forward (same weights) as the torch forward is."""
        model, model32 = _fused_model(architecture, dtype), _fused_model(architecture, torch.float32)
        with torch.no_grad():
            for parameter, parameter32 in zip(model.parameters(), model32.parameters()):
                parameter.copy_(parameter32)
        c, block_size = model.config, 4
        tables = [[3, 0, 5, 9], [1, 7, 2, 0], [8, 4, 6, 0]]
        kv_cache = torch.randn(c.num_layers, 2, 10, block_size, c.num_kv_heads, c.head_dim).to(dtype).to(_DEVICE)
        runs = {"torch": (model, False, kv_cache), "triton": (model, True, kv_cache.clone()),
                "fp32": (model32, False, kv_cache.float())}
        generator = torch.Generator().manual_seed(2)
        steps = [([0, 0, 0], [6, 9, 3]),   # prefills
                 ([6, 9, 3], [14, 10, 4])]  # an 8-token chunk after 6 cached tokens, two decodes
        for starts, ends in steps:
            positions, meta = _paged_batch(ends, starts, tables, block_size, _DEVICE)
            input_ids = torch.randint(0, c.vocab_size, positions.shape, generator=generator).to(_DEVICE)
            logits = {}
            for name, (run_model, use_triton, cache) in runs.items():
                run_model.use_triton = use_triton
                with torch.no_grad():
                    logits[name] = run_model(input_ids, positions, cache, meta, meta.query_start_loc[1:].long() - 1)
            if dtype == torch.float32:
                torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-4, atol=1e-4)
            else:
                assert (_relative_error(logits["triton"], logits["fp32"])
                        < 2 * _relative_error(logits["torch"], logits["fp32"]))
        if dtype == torch.float32:
            torch.testing.assert_close(runs["triton"][2], runs["torch"][2], rtol=1e-4, atol=1e-4)
        else:
            caches = {name: run[2] for name, run in runs.items()}
            assert (_relative_error(caches["triton"], caches["fp32"])
                    < 2 * _relative_error(caches["torch"], caches["fp32"]))

    @pytest.mark.skipif(not _CUDA, reason="CUDA graphs need a GPU")
    def test_fused_forward_replays_in_cuda_graph(self):
        """A decode step captured once, replayed with other positions, slots and contexts."""
        model = _fused_model("qwen3", torch.bfloat16)
        c, block_size, num_seqs = model.config, 16, 8
        kv_cache = torch.randn(c.num_layers, 2, 64, block_size, c.num_kv_heads, c.head_dim,
                               dtype=torch.bfloat16, device="cuda")
        tables = torch.randperm(64).view(num_seqs, 8).tolist()
        positions, meta = _paged_batch([1] * num_seqs, [0] * num_seqs, tables, block_size, _DEVICE)
        input_ids = torch.zeros(num_seqs, dtype=torch.int64, device="cuda")
        with torch.no_grad():
            model(input_ids, positions, kv_cache, meta)  # compiles the kernels outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = model(input_ids, positions, kv_cache, meta)
            generator = torch.Generator().manual_seed(3)
            for _ in range(2):
                ends = torch.randint(1, 8 * block_size, (num_seqs,), generator=generator).tolist()
                new_positions, new_meta = _paged_batch(ends, [e - 1 for e in ends], tables, block_size, _DEVICE)
                for name in ("slot_mapping", "seq_lens"):
                    getattr(meta, name).copy_(getattr(new_meta, name))
                positions.copy_(new_positions)
                input_ids.copy_(torch.randint(0, c.vocab_size, (num_seqs,), generator=generator))
                expected_cache = kv_cache.clone()
                graph.replay()
                model.use_triton = False
                expected = model(input_ids, positions, expected_cache, new_meta)
                model.use_triton = True
                error = _relative_error(logits, expected)
                assert error < 3e-2, f"relative error {error:.2e}"


# ==== engine.py ===================================================================================

def _assert_pool_free(llm):
    """Invariant: once nothing runs, every block is free again and the engine holds no request."""
    assert not llm.has_unfinished_requests() and llm.in_flight is None and not llm.output_processor.live
    kv = llm.scheduler.kv_cache_manager
    assert len(kv.free_queue) == kv.num_blocks
    assert all(block.ref_count == 0 for block in kv.blocks)


def _prompts(count, vocab, seed=0, longest=40):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, longest))] for _ in range(count)]

# Greedy outputs must not depend on how the engine cuts and packs the work.
_BASE = dict(block_size=16, max_num_batched_tokens=8192, max_num_seqs=32, enable_prefix_caching=True,
             async_scheduling=True)
_VARIANTS = {
    "sync": dict(async_scheduling=False),
    "eager": dict(enforce_eager=True),  # on a GPU: no CUDA graphs
    "no-prefix-cache": dict(enable_prefix_caching=False),
    "block-1": dict(block_size=1),
    "block-4": dict(block_size=4),
    "block-32": dict(block_size=32),
    "budget-1": dict(max_num_batched_tokens=1),
    "budget-7": dict(max_num_batched_tokens=7),
    "budget-64-sync": dict(max_num_batched_tokens=64, async_scheduling=False),
    "seqs-1": dict(max_num_seqs=1),
    "seqs-3": dict(max_num_seqs=3),
    "preempt": dict(block_size=4, num_blocks=24, max_model_len=64),
    "preempt-sync": dict(block_size=4, num_blocks=24, max_model_len=64, async_scheduling=False),
}


def _invariance_workload():
    prompts = _prompts(8, 512, seed=2)
    shared = [5] * 20 + [9, 8, 7]  # a shared prefix, so the prefix cache has something to hit
    prompts += [shared + [1], shared + [2, 3], shared]
    params = [SamplingParams(temperature=0, max_tokens=3 + i % 9, ignore_eos=True) for i in range(len(prompts))]
    return prompts, params


@pytest.fixture(scope="module")
def reference_outputs():
    prompts, params = _invariance_workload()
    llm = LLM("tiny", dtype=torch.float32, **_BASE)
    outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.scheduler.kv_cache_manager.num_hit_tokens > 0  # the shared prefix was reused
    _assert_pool_free(llm)
    return outputs


def _sampling_tensors(rows, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, device="cpu"):
    return sampler.SamplingTensors(
        temperature=torch.full((rows,), float(temperature), device=device),
        top_p=torch.full((rows,), float(top_p), device=device),
        top_k=torch.full((rows,), top_k, dtype=torch.int32, device=device),
        seeds=torch.arange(rows, dtype=torch.int32, device=device) * 7919 + 1,
        all_greedy=temperature == 0, needs_top_k_top_p=top_k > 0 or top_p < 1 or min_p > 0,
        min_p=torch.full((rows,), float(min_p), device=device) if min_p else None)


def _frequencies(probabilities, rows=20000, device="cpu", **params):
    logits = torch.tensor(probabilities, device=device).log().repeat(rows, 1)
    tokens = sampler.sample(logits, _sampling_tensors(rows, device=device, **params))
    return (torch.bincount(tokens, minlength=len(probabilities)).float() / rows).tolist()

# Where a step can fail: building its inputs, half-way through the forward (layer 1 of the tiny
# model: layer 0 has written its K/V), sampling, and the scheduler's update. Each fails on its 2nd call.
_FAULT_PLACES = {
    "inputs": (engine.ModelRunner, "prepare_inputs"),
    "forward": (model.DecoderLayer, "forward"),
    "sampling": (engine, "sample"),
    "update": (Scheduler, "update"),
}


def _fail_on_second_call(monkeypatch, owner, name, error):
    original, calls = getattr(owner, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, failing)


def _poison_taken_blocks(llm):
    """NaN into every block the pool hands out, so a block whose K/V no step wrote stays NaN."""
    manager, kv_caches = llm.scheduler.kv_cache_manager, llm.runner.kv_caches
    take = manager._take_free_block

    def take_and_poison():
        block = take()
        kv_caches[:, :, block.block_id] = float("nan")
        return block
    manager._take_free_block = take_and_poison


def _assert_cached_blocks_were_written(llm):
    for block in llm.scheduler.kv_cache_manager.cached_blocks.values():
        assert not llm.runner.kv_caches[:, :, block.block_id].isnan().any(), f"block {block.block_id}"


def _hf_logprobs(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def _assert_logprob_entry(entry, token, row, k):
    """One position's dict against HF's log_softmax row: the token's logprob and rank, the top k."""
    top = row.topk(k)
    assert set(entry) == {token, *top.indices.tolist()}
    assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
    assert entry[token].rank == int((row > row[token]).sum()) + 1
    for rank, (value, top_id) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        assert entry[top_id].logprob == pytest.approx(value, abs=1e-4) and entry[top_id].rank == rank


_LOGPROB_VARIANTS = {"async": {}, "sync": dict(async_scheduling=False), "chunked": dict(max_num_batched_tokens=7),
                     "preempt": dict(num_blocks=24, max_model_len=64)}


def _penalized_reference(hf, prompt, steps, repetition=1.0, presence=0.0, frequency=0.0, min_tokens=0, banned=()):
    """Greedy tokens from HF logits with vLLM's penalties and min_tokens' ban applied by hand."""
    tokens = []
    for _ in range(steps):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tokens])).logits[0, -1].double()
        for t in set(prompt) | set(tokens):
            logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
        for t, count in Counter(tokens).items():
            logits[t] -= frequency * count + presence
        if len(tokens) < min_tokens:
            logits[list(banned)] = float("-inf")
        tokens.append(int(logits.argmax()))
    return tokens


def _byte_tokenizer_checkpoint(tmp_path, chat_template=None, specials=("<|endoftext|>",), config=None, **overrides):
    """A tiny HF checkpoint with a trained byte-level BPE (every byte a token of its own too)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    hf = _hf_checkpoint(tmp_path, "LlamaForCausalLM", **overrides)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the cat sat on the mat", "a dog ate the hat", "hello user, assistant"] * 20,
                                  trainer)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = dict(config or {}, tokenizer_class="PreTrainedTokenizerFast")
    if chat_template is not None:
        config["chat_template"] = chat_template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return hf


def _scripted_sampler(monkeypatch, token_ids):
    """Every row samples the next token of the script (one request at a time)."""
    script = iter(token_ids)

    def scripted(logits, params):
        return torch.tensor([next(script) for _ in range(logits.shape[0])], device=logits.device)
    monkeypatch.setattr(engine, "sample", scripted)


_LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
_CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# A tool-calling ChatML template (Qwen2.5's shape), a Qwen3-style thinking switch, and HF's {% generation %} tag.
_TOOLS_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are helpful.' }}{%- endif %}{{- '\n\n# Tools\n<tools>' }}{%- for tool in tools %}{{- '\n' }}"
    "{{- tool | tojson }}{%- endfor %}{{- '\n</tools><|im_end|>\n' }}{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'user' or (message.role == 'assistant' and not "
    "message.tool_calls) %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}{%- if message.content %}"
    "{{- '\n' + message.content }}{%- endif %}{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\n<tool_call>\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}{{- tool_call.arguments | tojson }}"
    "{{- '}\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\n' }}{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
_THINKING_TEMPLATE = (
    "{%- for message in messages %}{%- if message.role == 'assistant' and message.reasoning_content is defined %}"
    "{{- '<|im_start|>assistant\n<think>\n' + message.reasoning_content + '\n</think>\n\n' + message.content + "
    "'<|im_end|>\n' }}{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}")
_GENERATION_TAG_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ '<|im_start|>assistant\n' + message['content'] + '<|im_end|>\n' }}{% endgeneration %}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
_WEATHER_TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
_TOOL_CONVERSATION = [
    {"role": "system", "content": "the cat"}, {"role": "user", "content": "hat?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": {"city": "Oz"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "a dog"}, {"role": "user", "content": "the mat?"}]
_THINKING_CONVERSATION = [{"role": "user", "content": "hello"},
                          {"role": "assistant", "content": "the cat", "reasoning_content": "a dog ate"},
                          {"role": "user", "content": "the hat"}]
# name: (template, conversation, add_generation_prompt, LLM.chat's keyword arguments)
_CHAT_CASES = {
    "tools": (_TOOLS_TEMPLATE, _TOOL_CONVERSATION, True, dict(tools=[_WEATHER_TOOL])),
    "no-tools": (_TOOLS_TEMPLATE, _TOOL_CONVERSATION, True, {}),
    "thinking-off": (_THINKING_TEMPLATE, _THINKING_CONVERSATION, True,
                     dict(chat_template_kwargs=dict(enable_thinking=False))),
    "thinking-on": (_THINKING_TEMPLATE, _THINKING_CONVERSATION, True, {}),
    "continue": (_CHATML_TEMPLATE, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the ca"}],
                 False, dict(continue_final_message=True)),
    "continue-trimmed": (_LLAMA3_TEMPLATE,  # the template trims the message: the cut drops the spaces after it
                         [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a d  "}], False,
                         dict(continue_final_message=True)),
    "generation-tag": (_GENERATION_TAG_TEMPLATE, _THINKING_CONVERSATION, True, {}),
}
_CHAT_SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|im_start|>",
                  "<|im_end|>"]


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A tiny checkpoint with a byte-level BPE and the ChatML template; HF's tokenizer of the same files."""
    import transformers
    path = tmp_path_factory.mktemp("chat")
    _byte_tokenizer_checkpoint(path, _CHATML_TEMPLATE, _CHAT_SPECIALS, dict(bos_token="<|begin_of_text|>",
                                                                          eos_token="<|im_end|>"),
                               max_position_embeddings=1024)
    return str(path), transformers.AutoTokenizer.from_pretrained(str(path))


def _hf_chat(hf_tokenizer, conversation, tokenize, add_generation_prompt=True, chat_template=None, tools=None,
             continue_final_message=False, chat_template_kwargs=None):
    """HF's apply_chat_template with LLM.chat's arguments: the text, or the ids."""
    out = hf_tokenizer.apply_chat_template(conversation, tools=tools, chat_template=chat_template, tokenize=tokenize,
                                           add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final_message,
                                           **(chat_template_kwargs or {}))
    return list(out["input_ids"] if hasattr(out, "keys") else out) if tokenize else out


class TestEngine:
    """engine.py's LLM end to end against HF generate, against itself across settings; sampling vs its distribution."""

    @pytest.mark.parametrize("architecture, tie, overrides", [
        ("LlamaForCausalLM", False, {}), ("Qwen3ForCausalLM", True, dict(head_dim=16))], ids=["llama", "qwen3"])
    def test_greedy_matches_hf_generate(self, tmp_path, architecture, tie, overrides):
        hf = _hf_checkpoint(tmp_path, architecture, tie, **overrides)
        prompts = _prompts(6, 300, seed=1)
        with pytest.warns(UserWarning, match=f"{tmp_path}: no tokenizer.json.*prompts must be token ids"):
            llm = LLM(str(tmp_path), dtype=torch.float32, block_size=4, max_num_seqs=16)
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
        for prompt, output in zip(prompts, outputs):
            with torch.no_grad():
                expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                       eos_token_id=7, pad_token_id=0)[0, len(prompt):].tolist()
            assert output.outputs[0].token_ids == expected
            assert output.outputs[0].finish_reason == ("stop" if expected[-1] == 7 else "length")
        _assert_pool_free(llm)

    @pytest.mark.parametrize("variant", sorted(_VARIANTS))
    def test_greedy_is_invariant_to_engine_settings(self, reference_outputs, variant):
        prompts, params = _invariance_workload()
        llm = LLM("tiny", dtype=torch.float32, **{**_BASE, **_VARIANTS[variant]})
        outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert outputs == reference_outputs
        if variant.startswith("preempt"):
            assert llm.scheduler.num_preemptions > 0  # the pool really was too small for everyone
        _assert_pool_free(llm)

    def test_greedy_alone_equals_batched(self, reference_outputs):
        prompts, params = _invariance_workload()
        llm = LLM("tiny", dtype=torch.float32, **_BASE)
        for prompt, sp, expected in zip(prompts, params, reference_outputs):
            assert llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids == expected
        _assert_pool_free(llm)

    def test_fp8_kv_cache_is_invariant_to_engine_settings(self):
        prompts, params = _invariance_workload()
        runs = {}
        for variant in ("base", "sync", "no-prefix-cache", "block-4", "budget-7", "preempt"):
            llm = LLM("tiny", dtype=torch.float32, kv_cache_dtype="fp8", **{**_BASE, **_VARIANTS.get(variant, {})})
            assert llm.runner.kv_caches.dtype == FP8
            runs[variant] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            _assert_pool_free(llm)
        assert llm.scheduler.num_preemptions > 0
        assert all(run == runs["base"] for run in runs.values()), runs

    def test_fp8_kv_cache_stays_close_to_full_precision(self, tmp_path):
        """Teacher-forced logits of a 250-token prompt (one prefill reading its own quantized K/V) with fp8
        and fp32 caches: uncalibrated scales (1.0) and calibrated ones."""
        _hf_checkpoint(tmp_path, "Qwen3ForCausalLM", tie=True, head_dim=16)
        net = _load(str(tmp_path))
        c, block_size, length = net.config, 16, 250
        positions, meta = _paged_batch([length], [0], [list(range(16))], block_size)
        input_ids = torch.randint(0, c.vocab_size, (length,), generator=torch.Generator().manual_seed(4))
        logits = {}
        for name, dtype, calibrate in (("fp32", torch.float32, False), ("fp8", FP8, False), ("fp8-calibrated", FP8, True)):
            for layer in net.layers:
                layer.calibrate_kv_scale, layer.kv_scale[:] = calibrate, 1.0
            caches = torch.zeros(c.num_layers, 2, 16, block_size, c.num_kv_heads, c.head_dim, dtype=dtype)
            with torch.no_grad():
                logits[name] = net(input_ids, positions, caches, meta)
        for name in ("fp8", "fp8-calibrated"):
            cosine = F.cosine_similarity(logits[name], logits["fp32"], dim=-1)
            agreement = (logits[name].argmax(-1) == logits["fp32"].argmax(-1)).float().mean()
            # (measured: cosine min 0.990-0.993, mean 0.998; agreement 0.90-0.91, the misses near-ties of a random model)
            assert cosine.min() > 0.98 and cosine.mean() > 0.995 and agreement > 0.85, (name, cosine, agreement)
        assert not torch.equal(logits["fp8"], logits["fp32"])  # the cache really was fp8

    def test_calculate_kv_scales_sets_them_from_the_first_batch_then_freezes_them(self):
        llm = LLM("tiny", dtype=torch.float32, kv_cache_dtype="fp8", calculate_kv_scales=True, **_BASE)
        prompts = _prompts(4, 512, seed=5)
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        scales = [layer.kv_scale.clone() for layer in llm.runner.model.layers]
        for layer, scale in zip(llm.runner.model.layers, scales):
            assert not layer.calibrate_kv_scale and not torch.equal(scale.cpu(), torch.ones(2))
        # amax / 448: the first batch's largest |K| and |V| land on fp8's largest value, in every layer
        assert torch.equal(llm.runner.kv_caches.float().abs().amax(dim=(2, 3, 4, 5)).cpu(),
                           torch.full((len(scales), 2), attention.FP8_MAX))
        llm.generate([[p * 7 % 512 for p in prompt] for prompt in prompts], SamplingParams(max_tokens=4), use_tqdm=False)
        assert all(torch.equal(layer.kv_scale, scale) for layer, scale in zip(llm.runner.model.layers, scales))
        auto = LLM("tiny", dtype=torch.float32, calculate_kv_scales=True, **_BASE)  # no fp8 cache: nothing to calibrate
        auto.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
        assert all(torch.equal(layer.kv_scale.cpu(), torch.ones(2)) for layer in auto.runner.model.layers)

    def test_kv_scales_load_from_a_checkpoint(self, tmp_path):
        _hf_checkpoint(tmp_path, "LlamaForCausalLM")
        tensors = load_file(tmp_path / "model.safetensors")
        for i in range(2):  # llm-compressor's names: a scalar per layer, K and V
            tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.5 + i)
            tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([0.25])
        save_file(tensors, tmp_path / "model.safetensors")
        llm = LLM(str(tmp_path), dtype=torch.float32, kv_cache_dtype="fp8_e4m3", block_size=4)
        assert [layer.kv_scale.tolist() for layer in llm.runner.model.layers] == [[0.5, 0.25], [1.5, 0.25]]
        # the cache holds K / k_scale: layer 0's largest |K| is twice what an unscaled run stores there
        unscaled = LLM(str(tmp_path), dtype=torch.float32, block_size=4)
        for engine_ in (llm, unscaled):  # one token: only the prompt's K/V are written
            engine_.generate([[1, 2, 3] * 5], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        torch.testing.assert_close(llm.runner.kv_caches[0, 0].float().abs().max(),
                                   unscaled.runner.kv_caches[0, 0].abs().max() / 0.5, rtol=0.07, atol=0)
        output = llm.generate([[1, 2, 3] * 5], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
        assert len(output.outputs[0].token_ids) == 5

    @pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
    def test_a_bad_kv_scale_in_a_checkpoint_is_refused(self, tmp_path, bad):
        _hf_checkpoint(tmp_path, "LlamaForCausalLM")
        tensors = load_file(tmp_path / "model.safetensors")
        tensors["model.layers.1.self_attn.v_scale"] = torch.tensor(bad)
        save_file(tensors, tmp_path / "model.safetensors")
        with pytest.raises(ValueError, match="model.layers.1.self_attn.v_scale.*finite and > 0"):
            LLM(str(tmp_path), dtype=torch.float32, kv_cache_dtype="fp8")

    def test_bad_kv_cache_dtype_lists_the_choices(self):
        with pytest.raises(ValueError, match="kv_cache_dtype must be one of 'auto', 'fp8', 'fp8_e4m3', got 'int4'"):
            LLM("tiny", kv_cache_dtype="int4")
        with pytest.raises(ValueError, match="calculate_kv_scales must be a bool"):
            LLM("tiny", kv_cache_dtype="fp8", calculate_kv_scales="yes")

    def test_seeded_sampling_is_invariant_to_engine_settings(self):
        """Seeded draws depend on (seed, token index) only: async, preemption and chunking change nothing."""
        prompts, _ = _invariance_workload()
        params = [SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=6, ignore_eos=True)
                  for i in range(len(prompts))]
        runs = []
        for variant in ({}, dict(async_scheduling=False), dict(block_size=4, num_blocks=24, max_model_len=64),
                        dict(max_num_batched_tokens=7)):
            llm = LLM("tiny", dtype=torch.float32, **{**_BASE, **variant})
            runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
            _assert_pool_free(llm)
        assert all(run == runs[0] for run in runs)
        greedy = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(
            temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)]
        assert runs[0] != greedy  # the draws really were random

    def test_text_prompts_with_a_real_tokenizer(self, tmp_path):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        hf = _hf_checkpoint(tmp_path, "Qwen3ForCausalLM", tie=True, head_dim=16)
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=299, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(["the cat sat on the mat", "a dog ate the hat"] * 20, trainer)
        tokenizer.save(str(tmp_path / "tokenizer.json"))
        llm = LLM(str(tmp_path), dtype=torch.float32, max_num_seqs=16)
        [output] = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        ids = tokenizer.encode("the cat").ids
        assert output.prompt == "the cat" and output.prompt_token_ids == ids
        with torch.no_grad():
            expected = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=7,
                                   pad_token_id=0)[0, len(ids):].tolist()
        assert output.outputs[0].token_ids == expected
        specials = {tokenizer.token_to_id("<|endoftext|>")}
        assert output.outputs[0].text == tokenizer.decode([t for t in expected if t not in specials])
        # A stop token ends the request and is returned as an id, but not as text (as vLLM does).
        stop = expected[3]
        k = expected.index(stop)
        [stopped] = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop]),
                                 use_tqdm=False)
        assert stopped.outputs[0].token_ids == expected[: k + 1] and stopped.outputs[0].finish_reason == "stop"
        assert stopped.outputs[0].text == tokenizer.decode([t for t in expected[:k] if t not in specials])
        # Generation stops on the model's EOS (config: 7) and the tokenizer's (tokenizer_config.json).
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
        assert LLM(str(tmp_path), dtype=torch.float32, max_num_seqs=4).scheduler.eos_token_ids == [7, *specials]


    def test_dict_prompts_are_the_same_requests_as_token_id_lists(self):
        """{"prompt_token_ids": ids} runs the same request as the bare list ids; "prompt" text given with
        the ids comes back as output.prompt."""
        llm = LLM("tiny", dtype=torch.float32, max_num_seqs=4)
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        as_dict, as_list, other = llm.generate([{"prompt_token_ids": [1, 2, 3]}, [1, 2, 3], {"prompt_token_ids": [4]}],
                                               params, use_tqdm=False)
        assert as_dict.outputs[0].token_ids == as_list.outputs[0].token_ids != other.outputs[0].token_ids
        assert len(as_list.outputs[0].token_ids) == 6
        assert as_dict.prompt_token_ids == as_list.prompt_token_ids == [1, 2, 3] and other.prompt_token_ids == [4]
        assert as_dict.prompt is None and as_list.prompt is None
        [with_text] = llm.generate([{"prompt": "one two three", "prompt_token_ids": [1, 2, 3]}], params,
                                   use_tqdm=False)
        assert with_text.prompt == "one two three" and with_text.prompt_token_ids == [1, 2, 3]
        assert with_text.outputs[0].token_ids == as_list.outputs[0].token_ids
        _assert_pool_free(llm)

    def test_num_cached_tokens_counts_prefix_cache_hits(self):
        """A 40-token prompt run twice with blocks of 16: the second run finds 2 full blocks cached (the
        partial third is computed again); without prefix caching nothing is. The tokens never change."""
        prompt = list(range(1, 41))
        params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
        runs = {}
        for caching in (True, False):
            llm = LLM("tiny", dtype=torch.float32, block_size=16, max_num_seqs=4, enable_prefix_caching=caching)
            runs[caching] = [llm.generate([prompt], params, use_tqdm=False)[0] for _ in range(2)]
            _assert_pool_free(llm)
        assert [o.num_cached_tokens for o in runs[True]] == [0, 32]
        assert [o.num_cached_tokens for o in runs[False]] == [0, 0]
        tokens = [o.outputs[0].token_ids for o in runs[True] + runs[False]]
        assert all(t == tokens[0] for t in tokens) and len(tokens[0]) == 5

    def test_long_prefill_token_threshold_chunks_prompts(self):
        """With long_prefill_token_threshold=8 the 40-token prompt is prefilled in 5 chunks instead of
        one, so the same work takes 4 more steps; the greedy tokens are those of the unchunked engine."""
        prompts = [list(range(1, 41)), list(range(50, 75)), [5, 6, 7]]
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        outputs, steps = {}, {}
        for threshold in (0, 8):
            llm = LLM("tiny", dtype=torch.float32, block_size=16, max_num_seqs=4,
                      long_prefill_token_threshold=threshold)
            outputs[threshold] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            steps[threshold] = llm.stats.steps
            _assert_pool_free(llm)
        assert outputs[8] == outputs[0]
        assert steps[8] == steps[0] + 4

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
    def test_cuda_graph_padding_gives_the_eager_tokens(self):
        """Decode batches of 3, 5 and 9 requests have no graph of their own: they replay the graphs of 4, 8
        and 16 rows with padding rows, and give the tokens of the same engine run eagerly."""
        prompts = _prompts(9, 512, seed=5)
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        tokens = {}
        for eager in (False, True):
            llm = LLM("tiny", dtype=torch.float32, max_num_seqs=16, enforce_eager=eager)
            assert not {3, 5, 9} & set(llm.runner.graphs)
            tokens[eager] = []
            for n in (3, 5, 9):
                graph_steps = llm.stats.graph_steps
                tokens[eager].append([o.outputs[0].token_ids
                                      for o in llm.generate(prompts[:n], params, use_tqdm=False)])
                assert (llm.stats.graph_steps > graph_steps) == (not eager)  # this batch size replayed graphs
            _assert_pool_free(llm)
        assert tokens[False] == tokens[True]
        assert [len(batch) for batch in tokens[False]] == [3, 5, 9]

    # ---- sampling

    @pytest.mark.parametrize("params,expected", [
        (dict(), [0.5, 0.25, 0.15, 0.1]),
        (dict(temperature=0.5), [x * x / 0.345 for x in (0.5, 0.25, 0.15, 0.1)]),  # p^2 renormalised
        (dict(top_k=2), [2 / 3, 1 / 3, 0, 0]),
        (dict(top_p=0.7), [2 / 3, 1 / 3, 0, 0]),   # 0.5 < 0.7 so the second token is still needed
        (dict(top_p=0.8), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0]),
        (dict(top_k=3, top_p=0.99), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0]),
        (dict(min_p=0.4), [2 / 3, 1 / 3, 0, 0]),                 # p >= 0.4 * 0.5 survives
        (dict(min_p=0.25, top_p=0.8), [2 / 3, 1 / 3, 0, 0]),     # min_p first (top-p first keeps 3 tokens)
        (dict(min_p=0.2, temperature=0.5), [0.25 / 0.3125, 0.0625 / 0.3125, 0, 0]),  # on p^2, at T = 0.5
    ])
    def test_sampling_frequencies(self, params, expected):
        observed = _frequencies([0.5, 0.25, 0.15, 0.1], **params)  # the plain-torch draw on the CPU
        assert observed == pytest.approx(expected, abs=0.015)
        assert all(o == 0 for o, e in zip(observed, expected) if e == 0)
        if torch.cuda.is_available():  # the Triton draw, the one the engine uses on a GPU
            observed = _frequencies([0.5, 0.25, 0.15, 0.1], rows=200000, device="cuda", **params)
            assert observed == pytest.approx(expected, abs=0.005)
            assert all(o == 0 for o, e in zip(observed, expected) if e == 0)

    def test_gumbel_argmax_kernel(self):
        """The Triton draw (interpreted on a CPU, where each row costs ~15 ms: few rows, loose bound)."""
        cuda = torch.cuda.is_available()
        device, rows, tolerance = ("cuda", 200000, 0.005) if cuda else ("cpu", 400, 0.07)
        probabilities = torch.tensor([0.5, 0.25, 0.15, 0.1], device=device)
        logits = probabilities.log().repeat(rows, 1)
        temperature = torch.ones(rows, device=device)
        seeds = torch.arange(rows, dtype=torch.int32, device=device) * 7919 + 1
        tokens = sampler.gumbel_argmax(logits, temperature, seeds)
        observed = torch.bincount(tokens, minlength=4).float() / rows
        assert observed.tolist() == pytest.approx(probabilities.tolist(), abs=tolerance)
        few = slice(0, 50)
        assert torch.equal(sampler.gumbel_argmax(logits[few], temperature[few], seeds[few]), tokens[few])  # same seeds
        assert not torch.equal(sampler.gumbel_argmax(logits[few], temperature[few], seeds[few] + 1), tokens[few])
        # Greedy rows over a vocabulary spanning several tiles give exactly torch.argmax.
        wide = torch.randn(5, 9000, generator=torch.Generator().manual_seed(0)).to(device)
        wide[0, [3, 2100, 7000]] = wide[1, [4097, 6000]] = 9.0  # ties across tiles, within one: lowest index
        greedy = sampler.gumbel_argmax(wide, torch.zeros(5, device=device), seeds[:5])
        assert torch.equal(greedy, wide.argmax(-1)) and greedy[:2].tolist() == [3, 4097]

    @pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
    def test_rows_in_any_order_give_each_request_its_own_tokens(self, monkeypatch, async_scheduling):
        """The runner lays rows out shortest context first (attention starts the longest first) without
        touching the scheduler's plan; tokens are keyed by request, so rows in any other order (reversed,
        shuffled) give every request the same tokens as when it runs alone (greedy and seeded, logprobs)."""
        prompts = _prompts(6, 512, seed=5, longest=60)
        params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1),
                  SamplingParams(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True, logprobs=1)] * 3
        llm = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                  async_scheduling=async_scheduling)
        alone = [llm.generate([p], q, use_tqdm=False)[0].outputs[0] for p, q in zip(prompts, params)]
        orders, plans, batch_order = [], [], engine.batch_order

        def recording_order(scheduled):
            plans.append([entry.request for entry in scheduled])
            rows = batch_order(scheduled)
            orders.append([entry.start + entry.num_new_tokens for entry in rows])
            return rows
        monkeypatch.setattr(engine, "batch_order", recording_order)
        batched = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        assert all(order == sorted(order) for order in orders) and any(len(set(order)) > 1 for order in orders)
        assert any(plan != sorted(plan, key=lambda r: r.num_tokens) for plan in plans)  # the plan kept its order
        rng = random.Random(0)
        for reorder in (lambda rows: rows[::-1], lambda rows: rng.sample(rows, len(rows))):
            monkeypatch.setattr(engine, "batch_order", reorder)
            batched.extend(o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False))
        for i, output in enumerate(batched):
            assert output.token_ids == alone[i % 6].token_ids, i
            assert [list(entry) for entry in output.logprobs] == [list(entry) for entry in alone[i % 6].logprobs]
        _assert_pool_free(llm)

    def test_top_k_1_equals_greedy_and_seeds_are_batch_independent(self):
        prompts = _prompts(5, 512, seed=3)
        llm = LLM("tiny", dtype=torch.float32, block_size=8, max_num_seqs=16)
        greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        top1 = llm.generate(prompts, SamplingParams(temperature=1.0, top_k=1, max_tokens=8, ignore_eos=True),
                            use_tqdm=False)
        assert [o.outputs[0].token_ids for o in top1] == [o.outputs[0].token_ids for o in greedy]
        seeded = SamplingParams(temperature=1.0, max_tokens=16, seed=1234, ignore_eos=True)
        alone = llm.generate([prompts[0]], seeded, use_tqdm=False)[0].outputs[0].token_ids
        others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
        batch = llm.generate(prompts, [others, others, seeded, others, others], use_tqdm=False)
        alone_2 = llm.generate([prompts[2]], seeded, use_tqdm=False)[0].outputs[0].token_ids
        assert batch[2].outputs[0].token_ids == alone_2
        again = llm.generate([prompts[0]], seeded, use_tqdm=False)[0].outputs[0].token_ids
        assert again == alone
        unseeded = [o.outputs[0].token_ids for o in llm.generate([prompts[0]] * 4, others, use_tqdm=False)]
        assert len({tuple(t) for t in unseeded}) > 1  # without a seed, draws differ
        _assert_pool_free(llm)

    def test_sampling_edge_values_behave_like_vllm(self):
        llm = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=16, max_model_len=40)
        prompts = _prompts(3, 512, seed=4)
        greedy = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5,
                                                                                     ignore_eos=True), use_tqdm=False)]
        for params in (SamplingParams(temperature=1e-40, max_tokens=5, ignore_eos=True),   # below 1e-5: greedy
                       SamplingParams(temperature=1.0, top_p=1e-50, max_tokens=5, ignore_eos=True),  # keeps the top
                       SamplingParams(temperature=1.0, top_k=1, max_tokens=5, ignore_eos=True)):
            assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == greedy
        wide = SamplingParams(temperature=1.0, top_k=10**9, max_tokens=5, ignore_eos=True)  # beyond the vocabulary: off
        assert all(len(o.outputs[0].token_ids) == 5 for o in llm.generate(prompts, wide, use_tqdm=False))
        to_the_end = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False)[0]
        assert len(to_the_end.outputs[0].token_ids) == 40 - 3 and to_the_end.outputs[0].finish_reason == "length"
        params = SamplingParams(max_tokens=4)
        params.top_p = 0.0  # changed after construction: add_request checks again
        [bad] = llm.generate([[1, 2]], params, use_tqdm=False)
        assert bad.outputs[0].finish_reason == "error" and "top_p" in bad.error
        _assert_pool_free(llm)

    # ---- bad input, failures, the step API

    def test_engine_bad_requests_fail_alone(self):
        llm = LLM("tiny", dtype=torch.float32, block_size=4, max_model_len=64, max_num_seqs=16)
        vocab = llm.runner.model.config.vocab_size
        good = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
        prompts = [[1, 2, 3], [], list(range(70)), [3, vocab + 5], "text without a tokenizer", [4, 5, 6]]
        outputs = llm.generate(prompts, good, use_tqdm=False)
        assert [o.outputs[0].finish_reason for o in outputs] == ["length", "error", "error", "error", "error", "length"]
        assert [len(o.outputs[0].token_ids) for o in outputs] == [5, 0, 0, 0, 0, 5]
        assert "empty" in outputs[1].error and "max_model_len" in outputs[2].error
        assert str(vocab + 5) in outputs[3].error and "token ids" in outputs[4].error
        _assert_pool_free(llm)
        with pytest.raises(ValueError, match="block_size"):
            LLM("tiny", dtype=torch.float32, block_size=12)
        with pytest.raises(ValueError, match="max_model_len"):
            LLM("tiny", dtype=torch.float32, max_model_len=10**9)

    @pytest.mark.parametrize("argument,value", [
        ("seed", None), ("max_model_len", "64"), ("max_model_len", 1), ("block_size", 12), ("max_num_seqs", 0),
        ("max_num_batched_tokens", 2.0), ("gpu_memory_utilization", 1.5), ("num_blocks", 0),
        ("long_prefill_token_threshold", -1), ("async_scheduling", "yes")])
    def test_engine_arguments_are_checked_where_passed(self, argument, value):
        with pytest.raises(ValueError, match=f"^{argument} must be"):
            LLM("tiny", dtype=torch.float32, **{argument: value})

    @pytest.mark.parametrize("prompts", [None, 5, {"neither": 1}])
    def test_generate_rejects_what_is_not_a_prompt(self, prompts):
        llm = LLM("tiny", dtype=torch.float32, max_num_seqs=4)
        if isinstance(prompts, dict):  # one bad prompt among others fails alone
            assert llm.generate([prompts], use_tqdm=False)[0].error.startswith("prompt:")
        else:
            with pytest.raises(ValueError, match="^prompts: "):
                llm.generate(prompts, use_tqdm=False)
        _assert_pool_free(llm)

    @pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
    @pytest.mark.parametrize("error", [RuntimeError("injected"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
    @pytest.mark.parametrize("place", sorted(_FAULT_PLACES))
    def test_a_failed_step_leaves_no_trace(self, monkeypatch, place, error, async_scheduling):
        """generate() raises; afterwards the same prompts give a fresh engine's tokens, a request added
        with add_request() finishes as if nothing happened, no block leaks, and the prefix cache holds
        only blocks whose K/V was written (40-token prompts: 2 full blocks registered at allocation)."""
        settings = dict(dtype=torch.float32, block_size=16, max_num_seqs=8, async_scheduling=async_scheduling)
        prompts = [list(range(1, 41)), list(range(1, 41)) + [7, 7], [5, 6, 7]]
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        bystander = SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True, logprobs=2)
        fresh = LLM("tiny", **settings)
        expected = [o.outputs[0].token_ids for o in fresh.generate(prompts, params, use_tqdm=False)]
        expected_bystander = fresh.generate([[3, 1, 4, 1, 5]], bystander, use_tqdm=False)[0].outputs[0].token_ids
        llm = LLM("tiny", **settings)
        _poison_taken_blocks(llm)
        llm.add_request("bystander", [3, 1, 4, 1, 5], bystander)
        with monkeypatch.context() as patch:
            _fail_on_second_call(patch, *_FAULT_PLACES[place], error)
            with pytest.raises(type(error)):
                llm.generate(prompts, params, use_tqdm=False)
        _assert_cached_blocks_were_written(llm)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
        final = [o for _ in range(100) if llm.has_unfinished_requests() for o in llm.step() if o.finished]
        assert [(o.request_id, o.outputs[0].token_ids) for o in final] == [("bystander", expected_bystander)]
        assert [list(d)[0] for d in final[0].outputs[0].logprobs] == expected_bystander  # one entry per token
        _assert_cached_blocks_were_written(llm)
        _assert_pool_free(llm)

    def test_generate_returns_its_own_requests_and_step_returns_the_others(self):
        """The contract: generate() returns once its own prompts are done; requests added with
        add_request() share its batches, and what they produced meanwhile comes with the next step()."""
        llm = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=16)
        greedy = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (20, 2, 50)]
        alone = [o.outputs[0].token_ids for o in llm.generate([[9, 9, 9], [8, 8], [7]], greedy, use_tqdm=False)]
        for request_id, prompt, params in zip("123", [[9, 9, 9], [8, 8], [7]], greedy):
            llm.add_request(request_id, prompt, params)
        outputs = llm.generate([[1, 2, 3], [4, 5, 6], 5], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                               use_tqdm=False)
        assert [o.prompt_token_ids for o in outputs[:2]] == [[1, 2, 3], [4, 5, 6]]
        assert [len(o.outputs[0].token_ids) for o in outputs] == [3, 3, 0]
        assert outputs[2].outputs[0].finish_reason == "error" and "prompt" in outputs[2].error  # not ids: fails alone
        assert not {"1", "2", "3"} & {o.request_id for o in outputs}  # generate's ids skip the ones in use
        assert llm.has_unfinished_requests()
        aborted = llm.abort("3")
        assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
        assert aborted.outputs[0].token_ids == alone[2][:len(aborted.outputs[0].token_ids)]
        final = {}
        while llm.has_unfinished_requests():
            final.update((o.request_id, o) for o in llm.step() if o.finished)
        assert final["2"].outputs[0].token_ids == alone[1]  # it finished inside generate(): not lost
        assert final["1"].outputs[0].token_ids == alone[0] and set(final) == {"1", "2"}
        _assert_pool_free(llm)
        assert llm.abort("1") is None  # already finished: nothing to do

    def test_step_api_streams_and_abort_frees_blocks(self):
        llm = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=16)
        llm.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        llm.add_request("b", [4, 5, 6, 7], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
        seen = {"a": [], "b": []}
        while llm.has_unfinished_requests():
            for output in llm.step():
                seen[output.request_id].append(len(output.outputs[0].token_ids))
                if output.request_id == "a" and output.finished:
                    aborted = llm.abort("b")
                    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
        assert seen["a"] == [1, 2, 3, 4, 5, 6]  # one token per step, streamed
        assert 0 < len(seen["b"]) and max(seen["b"]) < 50
        _assert_pool_free(llm)
        llm.add_request("c", [1], SamplingParams())
        with pytest.raises(ValueError, match="'c'"):  # an id already in use
            llm.add_request("c", [1], SamplingParams())
        llm.abort("c")
        _assert_pool_free(llm)


    @pytest.mark.parametrize("variant", sorted(_LOGPROB_VARIANTS))
    def test_logprobs_and_prompt_logprobs_equal_hf_log_softmax(self, tmp_path, variant):
        hf = _hf_checkpoint(tmp_path, "LlamaForCausalLM")
        prompts = _prompts(4, 300, seed=5, longest=30)
        prompts += [prompts[0], prompts[0][:20] + [3, 4]]  # a prefix cached by then: prompt logprobs skip no position
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2)
        llm = LLM(str(tmp_path), dtype=torch.float32, block_size=4, max_num_seqs=8, **_LOGPROB_VARIANTS[variant])
        outputs = llm.generate(prompts, params, use_tqdm=False)
        if variant == "preempt":
            assert llm.scheduler.num_preemptions > 0
        for prompt, output in zip(prompts, outputs):
            completion = output.outputs[0]
            logprobs = _hf_logprobs(hf, prompt + completion.token_ids)
            assert len(completion.logprobs) == len(completion.token_ids) == 6
            for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
                _assert_logprob_entry(entry, token, logprobs[len(prompt) - 1 + i], k=3)
            expected = sum(logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(completion.token_ids))
            assert completion.cumulative_logprob == pytest.approx(expected, abs=1e-3)
            assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(prompt)
            for p in range(1, len(prompt)):
                _assert_logprob_entry(output.prompt_logprobs[p], prompt[p], logprobs[p - 1], k=2)
        _assert_pool_free(llm)

    def test_no_logprobs_unless_asked(self):
        llm = LLM("tiny", dtype=torch.float32, max_num_seqs=4)
        [output] = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3), use_tqdm=False)
        assert output.prompt_logprobs is None and output.outputs[0].logprobs is None
        assert output.outputs[0].cumulative_logprob is None

    @pytest.mark.parametrize("async_scheduling", [True, False])
    def test_penalties_equal_a_reference_loop_over_hf_logits(self, tmp_path, async_scheduling):
        hf = _hf_checkpoint(tmp_path, "LlamaForCausalLM")
        llm = LLM(str(tmp_path), dtype=torch.float32, block_size=4, max_num_seqs=8, async_scheduling=async_scheduling)
        prompts = _prompts(3, 300, seed=6, longest=12)
        penalties = dict(repetition=1.5, presence=0.5, frequency=0.7)
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=1.5,
                                presence_penalty=0.5, frequency_penalty=0.7)
        plain = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
        # a batch mixing penalized and plain rows
        outputs = llm.generate(prompts + prompts[:1], [params] * 3 + [SamplingParams(temperature=0, max_tokens=10,
                                                                                   ignore_eos=True)], use_tqdm=False)
        for prompt, output in zip(prompts, outputs):
            assert output.outputs[0].token_ids == _penalized_reference(hf, prompt, 10, **penalties)
        assert outputs[3].outputs[0].token_ids == plain[0].outputs[0].token_ids
        assert [o.outputs[0].token_ids for o in outputs[:3]] != [o.outputs[0].token_ids for o in plain]
        _assert_pool_free(llm)

    def test_min_tokens_holds_back_stop_tokens(self, tmp_path):
        hf = _hf_checkpoint(tmp_path, "LlamaForCausalLM")
        llm = LLM(str(tmp_path), dtype=torch.float32, block_size=4, max_num_seqs=8)
        prompt = _prompts(1, 300, seed=7, longest=12)[0]
        first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0].outputs[0].token_ids[0]
        params = SamplingParams(temperature=0, max_tokens=8, min_tokens=3, stop_token_ids=[first], ignore_eos=True)
        [output] = llm.generate([prompt], params, use_tqdm=False)
        expected = _penalized_reference(hf, prompt, 8, min_tokens=3, banned=[first])
        if first in expected[3:]:  # after min_tokens the stop token stops it
            expected = expected[:expected.index(first, 3) + 1]
        assert output.outputs[0].token_ids == expected and first not in expected[:3]
        assert len(output.outputs[0].token_ids) >= 3
        one = SamplingParams(temperature=0, max_tokens=4, min_tokens=1, stop_token_ids=[first], ignore_eos=True)
        [output] = llm.generate([prompt], one, use_tqdm=False)  # the first token may not be the stop token
        expected = _penalized_reference(hf, prompt, 4, min_tokens=1, banned=[first])
        assert output.outputs[0].token_ids == expected[:expected.index(first, 1) + 1 if first in expected[1:] else 4]

    @pytest.mark.parametrize("include", [False, True])
    def test_stop_strings_cut_the_text_even_across_tokens_and_split_characters(self, tmp_path, monkeypatch, include):
        _byte_tokenizer_checkpoint(tmp_path)
        llm = LLM(str(tmp_path), dtype=torch.float32, block_size=4, max_num_seqs=4)
        tokenizer = llm.get_tokenizer()
        byte_ids = [tokenizer.encoding.encode_single_token(bytes([b])) for b in "ab\u00e9!zz".encode()]  # é = 2 bytes
        for stop in ("\u00e9!", "b\u00e9"):  # starting inside a split character; spanning three tokens
            _scripted_sampler(monkeypatch, byte_ids + [0] * 8)
            params = SamplingParams(max_tokens=7, stop=[stop, "never"], include_stop_str_in_output=include)
            [output] = llm.generate([[5, 6]], params, use_tqdm=False)
            completion, end = output.outputs[0], "ab\u00e9!".index(stop)
            assert completion.text == "ab\u00e9!"[:end + len(stop) if include else end]
            assert (completion.finish_reason, completion.stop_reason) == ("stop", stop)
            assert completion.token_ids == byte_ids[:5 if stop == "\u00e9!" else 4]  # up to the token completing it
        # streamed: the text never shows what may still become a stop string
        _scripted_sampler(monkeypatch, byte_ids + [0] * 8)
        llm.add_request("s", [5, 6], SamplingParams(max_tokens=7, stop="\u00e9!", include_stop_str_in_output=include))
        texts = [o.outputs[0].text for _ in range(20) if llm.has_unfinished_requests() for o in llm.step()]
        assert texts[-1] == ("ab\u00e9!" if include else "ab") and all(texts[-1].startswith(t) for t in texts)
        _assert_pool_free(llm)

    def test_stream_deltas_add_up_to_generate(self, tmp_path):
        """Seeded requests (n = 2, a stop string, logprobs, prompt logprobs, a bad prompt) streamed and
        generated: each completion's deltas concatenate to generate's token ids, text and logprobs, the
        text never splits a character, and each request's last output, and only that one, is finished."""
        _byte_tokenizer_checkpoint(tmp_path)
        # no prefix cache: the second run must compute what the first did, to the last bit (logprobs compare exactly)
        llm = LLM(str(tmp_path), dtype=torch.float32, block_size=4, max_num_seqs=8, enable_prefix_caching=False)
        prompts = ["the cat sat", "a dog ate the hat", "hello user", ""]
        params = [SamplingParams(temperature=1.0, seed=1, max_tokens=24, n=2, logprobs=2),
                  SamplingParams(temperature=1.0, seed=2, max_tokens=24, stop=["t", "\u00e9"]),
                  SamplingParams(temperature=1.0, seed=3, max_tokens=24, prompt_logprobs=1, ignore_eos=True),
                  SamplingParams()]
        expected = {o.prompt: o for o in llm.generate(prompts, params, use_tqdm=False)}
        streamed = {}  # prompt -> the outputs streamed for it
        for output in llm.stream(prompts, params):
            streamed.setdefault(output.prompt, []).append(output)
        assert streamed.keys() == expected.keys()
        for prompt, outputs in streamed.items():
            want = expected[prompt]
            assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
            assert bool(outputs[-1].error) == bool(want.error) and len({o.request_id for o in outputs}) == 1
            firsts = [o.prompt_logprobs for o in outputs if o.prompt_logprobs]
            assert firsts == ([want.prompt_logprobs] if want.prompt_logprobs else [])
            for index, completion in enumerate(want.outputs):
                deltas = [o.outputs[index] for o in outputs]
                assert [t for d in deltas for t in d.token_ids] == completion.token_ids
                assert "".join(d.text for d in deltas) == completion.text
                if completion.logprobs is not None:
                    assert [e for d in deltas for e in d.logprobs] == completion.logprobs
                    assert deltas[-1].cumulative_logprob == completion.cumulative_logprob
                assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == (completion.finish_reason,
                                                                              completion.stop_reason)
        assert expected[""].error and expected["a dog ate the hat"].outputs[0].finish_reason == "stop"
        _assert_pool_free(llm)

    def test_stream_never_splits_a_character(self, tmp_path, monkeypatch):
        _byte_tokenizer_checkpoint(tmp_path)
        llm = LLM(str(tmp_path), dtype=torch.float32, block_size=4, max_num_seqs=4)
        byte_ids = [llm.get_tokenizer().encoding.encode_single_token(bytes([b])) for b in "a\u00e9\U0001f642b".encode()]
        _scripted_sampler(monkeypatch, byte_ids)
        params = SamplingParams(max_tokens=len(byte_ids), ignore_eos=True)
        texts = [o.outputs[0].text for o in llm.stream([[5, 6]], params)]
        assert texts == ["a", "", "\u00e9", "", "", "", "\U0001f642", "b"]  # a character once all its bytes are in
        _assert_pool_free(llm)

    def test_stream_abort_and_early_exit_end_cleanly(self):
        llm = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=8)
        llm.add_request("bystander", [9, 9], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
        params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        seen = {}
        for output in llm.stream([[1, 2, 3], [4, 5, 6]], params):
            seen.setdefault(output.request_id, []).append(output)
            if output.request_id == next(iter(seen)) and len(seen[output.request_id]) == 3:
                assert llm.abort(output.request_id).outputs[0].finish_reason == "abort"
        aborted, done = seen.values()
        assert aborted[-1].finished and aborted[-1].outputs[0].finish_reason == "abort"
        assert sum(len(o.outputs[0].token_ids) for o in aborted) < 20 and not any(o.finished for o in aborted[:-1])
        assert done[-1].finished and sum(len(o.outputs[0].token_ids) for o in done) == 20
        # the bystander was stepped along; its outputs come with step(), the final one exactly once
        finals = [o for _ in range(40) if llm.has_unfinished_requests() for o in llm.step() if o.finished]
        assert [(o.request_id, len(o.outputs[0].token_ids)) for o in finals] == [("bystander", 30)]
        _assert_pool_free(llm)
        stream = llm.stream([[1, 2, 3], [7, 8]], params)
        next(stream)
        stream.close()  # the caller stops reading: its requests are aborted, their blocks freed
        while llm.has_unfinished_requests():
            assert not any(o.finished and o.outputs[0].finish_reason != "abort" for o in llm.step())
        _assert_pool_free(llm)

    def test_stream_keeps_every_final_output_when_loops_nest_or_close_early(self):
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        llm = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=8)
        seen = []
        for output in llm.stream([[1, 2, 3]], params):  # a generate() run inside the loop takes the stream's final
            seen.append(output)
            if len(seen) == 1:
                llm.generate([[4, 5]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
        assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "length"
        assert sum(len(o.outputs[0].token_ids) for o in seen) == 6 and not any(llm.output_processor.finals.values())
        stream = llm.stream([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
        next(stream)
        llm.add_request("bystander", [9, 9], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        for _ in stream:  # stop reading right after the step that finished the bystander
            if "bystander" not in llm.output_processor.groups:
                break
        stream.close()
        finals = [o for _ in range(40) if llm.has_unfinished_requests() for o in llm.step() if o.finished]
        assert [(o.request_id, len(o.outputs[0].token_ids)) for o in finals] == [("bystander", 3)]
        _assert_pool_free(llm)
        stream = llm.stream([{"prompt": "no tokenizer"}, [1, 2, 3]], params)
        assert next(stream).error  # closed while the bad prompt's output is read: the good one is aborted
        stream.close()
        assert not llm.has_unfinished_requests() and not llm.scheduler.requests
        _assert_pool_free(llm)

    def test_stream_sends_prompt_logprobs_as_they_are_scored(self):
        # 4 prompt rows a step: 40 take 10. No prefix cache: both runs then have the same steps, so the same bits (on
        # a GPU, a row's fp32 logits depend on the matmul's shape, which cache hits would change)
        llm = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=4, enable_prefix_caching=False)
        params = SamplingParams(temperature=0, max_tokens=3, n=2, prompt_logprobs=1, ignore_eos=True)
        [whole] = llm.generate([list(range(1, 41))], params, use_tqdm=False)
        deltas = [o.prompt_logprobs for o in llm.stream([list(range(1, 41))], params)]
        assert len(whole.prompt_logprobs) == 40 and [e for d in deltas if d for e in d] == whole.prompt_logprobs
        assert deltas[0] is not None and len(deltas[0]) < 40  # completion 1 samples before 0 has scored the prompt

    def test_a_stop_string_inside_min_tokens_is_not_found_later(self, tmp_path, monkeypatch):
        _byte_tokenizer_checkpoint(tmp_path)
        llm = LLM(str(tmp_path), dtype=torch.float32, block_size=4, max_num_seqs=4)
        ids = [llm.get_tokenizer().encoding.encode_single_token(c.encode()) for c in "xzzqqqq"]
        params = SamplingParams(max_tokens=7, min_tokens=3, stop=["zz", "abcd"])
        _scripted_sampler(monkeypatch, ids)
        [output] = llm.generate([[5, 6]], params, use_tqdm=False)
        assert (output.outputs[0].text, output.outputs[0].finish_reason) == ("xzzqqqq", "length")  # vLLM's rule
        _scripted_sampler(monkeypatch, ids)
        assert "".join(o.outputs[0].text for o in llm.stream([[5, 6]], params)) == "xzzqqqq"

    def test_an_interrupted_add_request_queues_nothing(self, monkeypatch):
        llm = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=8)
        _fail_on_second_call(monkeypatch, Scheduler, "add", KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C while queueing the second of 3 completions
            llm.add_request("r", [1, 2, 3], SamplingParams(n=3, max_tokens=2))
        monkeypatch.undo()
        assert not llm.scheduler.requests and not llm.output_processor.live
        [output] = llm.generate([[1, 2, 3]], SamplingParams(n=3, max_tokens=2), use_tqdm=False)
        assert output.finished and len(output.outputs) == 3
        _assert_pool_free(llm)

    def test_more_completions_than_max_num_seqs_and_a_reused_id(self):
        llm = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=1)
        [output] = llm.generate([[5, 6, 7]], SamplingParams(n=3, max_tokens=3, ignore_eos=True), use_tqdm=False)
        assert output.finished and [len(c.token_ids) for c in output.outputs] == [3, 3, 3]
        llm = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=4)
        prompt, other = list(range(1, 20)), list(range(40, 60))
        llm.add_request("a", prompt, SamplingParams(max_tokens=4, prompt_logprobs=0))
        llm.step()  # launched: its prompt rows are in flight
        llm.abort("a")
        llm.add_request("a", other, SamplingParams(max_tokens=4, prompt_logprobs=0))  # the same id, another prompt
        final = [o for _ in range(20) if llm.has_unfinished_requests() for o in llm.step() if o.finished]
        assert [list(entry)[0] for entry in final[0].prompt_logprobs[1:]] == other[1:]
        llm = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=32)  # room for the whole prompt's rows
        [output] = llm.generate([prompt + [1]], SamplingParams(n=3, max_tokens=2, prompt_logprobs=1), use_tqdm=False)
        assert len(output.prompt_logprobs) == 20 and output.num_cached_tokens == 0
        assert llm.scheduler.kv_cache_manager.num_hit_tokens == 2 * 16  # only the first scores the prompt

    def test_stop_strings_need_text(self):
        llm = LLM("tiny", dtype=torch.float32, max_num_seqs=4)
        [output] = llm.generate([[1, 2]], SamplingParams(stop="x"), use_tqdm=False)
        assert output.outputs[0].finish_reason == "error" and "stop" in output.error

    def test_n_completions_share_the_prompt_and_reproduce_with_a_seed(self):
        llm = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=16)
        prompt = list(range(1, 30))  # 7 full blocks before the last token
        params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
        kv = llm.scheduler.kv_cache_manager
        [output] = llm.generate([prompt], params, use_tqdm=False)
        assert [c.index for c in output.outputs] == [0, 1, 2, 3] and output.finished
        assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for c in output.outputs)
        assert len({tuple(c.token_ids) for c in output.outputs}) > 1
        assert kv.num_hit_tokens == 3 * 28  # the prompt's blocks computed once, by the first completion
        [again] = llm.generate([prompt], params, use_tqdm=False)
        assert [c.token_ids for c in again.outputs] == [c.token_ids for c in output.outputs]
        greedy = llm.generate([prompt], SamplingParams(n=2, temperature=0, max_tokens=4), use_tqdm=False)[0]
        assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids
        stops = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=12, stop_token_ids=list(range(0, 512, 9)))
        [output] = llm.generate([prompt], stops, use_tqdm=False)  # completions that end at different steps
        assert output.finished and all(c.finish_reason in ("stop", "length") for c in output.outputs)
        assert len({len(c.token_ids) for c in output.outputs}) > 1
        llm.add_request("x", prompt, params)
        assert llm.abort("x").outputs[3].finish_reason == "abort"
        _assert_pool_free(llm)

    @pytest.mark.parametrize("template", [_LLAMA3_TEMPLATE, _CHATML_TEMPLATE], ids=["llama3", "chatml"])
    def test_chat_prompt_equals_hf_apply_chat_template(self, tmp_path, template):
        import transformers
        specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|im_start|>",
                    "<|im_end|>"]
        _byte_tokenizer_checkpoint(tmp_path, template, specials,
                                   dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"))
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
        conversations = [[{"role": "system", "content": "the cat"}, {"role": "user", "content": "hello  "}],
                         [{"role": "user", "content": "a dog ate the hat"}]]
        llm = LLM(str(tmp_path), dtype=torch.float32, max_num_seqs=4)
        outputs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
        for conversation, output in zip(conversations, outputs):
            expected = hf_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
            expected = expected["input_ids"] if hasattr(expected, "keys") else expected  # transformers 5: a BatchEncoding
            assert output.prompt_token_ids == list(expected)
            assert output.prompt == hf_tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                                     tokenize=False)
        assert outputs[0].prompt_token_ids.count(llm.get_tokenizer().encoding.encode_single_token("<|begin_of_text|>")) \
            == (template == _LLAMA3_TEMPLATE)  # no second BOS
        one = llm.chat(conversations[1], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
        assert one[0].outputs[0].token_ids == outputs[1].outputs[0].token_ids  # one conversation or a list

    @pytest.mark.parametrize("case", list(_CHAT_CASES))
    def test_chat_tools_kwargs_continue_and_generation_tag_render_as_hf(self, chat_checkpoint, case):
        path, hf_tokenizer = chat_checkpoint
        template, conversation, add_generation_prompt, options = _CHAT_CASES[case]
        llm = LLM(path, dtype=torch.float32, max_num_seqs=4)
        [output] = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=1), False, add_generation_prompt,
                            template, **options)
        reference = functools.partial(_hf_chat, hf_tokenizer, conversation, add_generation_prompt=add_generation_prompt,
                                      chat_template=template, **options)
        assert output.error is None and output.prompt == reference(tokenize=False)
        assert output.prompt_token_ids == reference(tokenize=True)
        if case == "continue":  # the prompt ends inside the assistant's message, where the model goes on
            assert output.prompt.endswith("<|im_start|>assistant\nthe ca")
        assert ("<think>\n\n</think>" in output.prompt) == (case == "thinking-off")
        if case == "thinking-on":  # vLLM's (and HF 5's) other names of the reasoning render the same
            for name in ("reasoning", "thinking"):
                renamed = [{name if k == "reasoning_content" else k: v for k, v in m.items()} for m in conversation]
                assert llm.chat_prompt(renamed, chat_template=template) == llm.chat_prompt(conversation,
                                                                                           chat_template=template)

    def test_chat_content_parts_are_joined_text_and_bad_messages_raise(self, chat_checkpoint):
        path, hf_tokenizer = chat_checkpoint
        llm = LLM(path, dtype=torch.float32, max_num_seqs=4)
        parts = [{"role": "system", "content": [{"type": "text", "text": "the cat"}]},
                 {"role": "user", "content": [{"type": "text", "text": "a dog"}, {"type": "text", "text": "the hat"}]}]
        joined = [{"role": "system", "content": "the cat"}, {"role": "user", "content": "a dog\nthe hat"}]  # vLLM's
        for template in (_CHATML_TEMPLATE, _LLAMA3_TEMPLATE):
            prompt = llm.chat_prompt(parts, chat_template=template)
            assert prompt["prompt"] == _hf_chat(hf_tokenizer, joined, False, chat_template=template)
            assert prompt["prompt_token_ids"] == _hf_chat(hf_tokenizer, joined, True, chat_template=template)
        image = [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                              {"type": "image_url", "image_url": {"url": "x"}}]}]
        bad = {"a string": ("hello", "messages must be a conversation"),
               "a lone dict": ({"role": "user", "content": "hi"}, "messages must be a conversation"),
               "no messages": ([], "messages must be a conversation"),
               "an image part": (image, "content part type 'image_url' is not supported"),
               "a message that is not a dict": ([[{"role": "user", "content": "hi"}, "hi"]], "must be a dict"),
               "both ends": ([{"role": "user", "content": "hi"}], "exclude each other")}
        for name, (messages, message) in bad.items():
            with pytest.raises(ValueError, match=message):
                llm.chat(messages, SamplingParams(max_tokens=1), use_tqdm=False,
                         continue_final_message=name == "both ends")
        assert not llm.has_unfinished_requests()

    def test_chat_without_a_template_says_so(self, tmp_path):
        _byte_tokenizer_checkpoint(tmp_path)
        with pytest.raises(ValueError, match="chat template"):
            LLM(str(tmp_path), dtype=torch.float32, max_num_seqs=4).chat([{"role": "user", "content": "hi"}])

    def test_load_weights_equals_a_fresh_engine_on_the_new_weights(self, tmp_path):
        hf = _hf_checkpoint(tmp_path / "a", "Qwen3ForCausalLM", tie=True, head_dim=16)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in hf.parameters():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
        hf.save_pretrained(tmp_path / "b")
        prompts, params = _prompts(4, 300, seed=8, longest=30), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        llm = LLM(str(tmp_path / "a"), dtype=torch.float32, block_size=4, max_num_seqs=8)
        before = llm.generate(prompts, params, use_tqdm=False)
        llm.load_weights(hf.state_dict().items())
        after = llm.generate(prompts, params, use_tqdm=False)
        fresh = LLM(str(tmp_path / "b"), dtype=torch.float32, block_size=4, max_num_seqs=8).generate(prompts, params,
                                                                                                  use_tqdm=False)
        assert [o.outputs[0].token_ids for o in after] == [o.outputs[0].token_ids for o in fresh]
        assert [o.outputs[0].token_ids for o in after] != [o.outputs[0].token_ids for o in before]
        assert all(o.num_cached_tokens == 0 for o in after)  # nothing computed with the old weights is reused
        llm.generate(prompts, params, use_tqdm=False)  # fills the prefix cache again
        with pytest.raises(ValueError, match="unexpected tensor 'nonsense'"):  # after one weight was loaded
            llm.load_weights([("model.norm.weight", torch.ones(64)), ("nonsense", torch.zeros(1))])
        assert not llm.scheduler.kv_cache_manager.cached_blocks  # its old K/V must not be reused

    def test_defaults_come_from_generation_config(self, tmp_path):
        hf = _hf_checkpoint(tmp_path, "LlamaForCausalLM")
        config = dict(temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.1, max_new_tokens=5, eos_token_id=7)
        (tmp_path / "generation_config.json").write_text(json.dumps(config))
        defaults = LLM(str(tmp_path), dtype=torch.float32, max_num_seqs=4).get_default_sampling_params()
        assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.repetition_penalty,
                defaults.max_tokens) == (0.7, 0.9, 20, 1.1, 5)
        (tmp_path / "generation_config.json").write_text(json.dumps(dict(config, do_sample=False)))
        llm = LLM(str(tmp_path), dtype=torch.float32, max_num_seqs=4)
        prompt = _prompts(1, 300, seed=9)[0]
        [output] = llm.generate([prompt], use_tqdm=False)  # greedy, with the checkpoint's penalty and length
        assert output.outputs[0].token_ids == _penalized_reference(hf, prompt, 5, repetition=1.1)[:len(
            output.outputs[0].token_ids)]
        assert len(output.outputs[0].token_ids) == 5 or output.outputs[0].token_ids[-1] == 7

    @pytest.mark.parametrize("field,value", [
        ("n", 0), ("logprobs", -1), ("prompt_logprobs", 1.5), ("presence_penalty", 2.5), ("frequency_penalty", -3),
        ("repetition_penalty", 0.0), ("min_p", 1.5), ("min_tokens", 20), ("stop", 5), ("stop", ["ok", 3]),
        ("include_stop_str_in_output", "yes"), ("detokenize", None)])
    def test_bad_sampling_values_name_the_field(self, field, value):
        with pytest.raises(ValueError, match=f"SamplingParams.{field} must be"):
            SamplingParams(max_tokens=16, **{field: value})


# ==== bench.py ====================================================================================

    @pytest.mark.skipif(not _CUDA, reason="sizing the KV cache from memory needs a GPU")
    def test_kv_sizing_reserves_the_graph_logits_at_their_dtype(self, monkeypatch):
        """Profiling reserves what the decode graphs keep alive after their capture (each its logits, in the
        model's dtype): the reserve equals the memory the capture leaves allocated, so the KV cache gets
        every block the user's gpu_memory_utilization pays for (a 4-byte reserve was twice this in bf16)."""
        monkeypatch.setitem(model.SHAPES, "wide-vocab", replace(SHAPES["tiny"], vocab_size=151936))
        capture, measured = engine.ModelRunner._capture_graphs, {}

        def measuring_capture(runner):
            before = torch.cuda.memory_allocated()
            capture(runner)
            measured["held"], measured["reserved"] = torch.cuda.memory_allocated() - before, runner.graph_logits_bytes()
        monkeypatch.setattr(engine.ModelRunner, "_capture_graphs", measuring_capture)
        llm = LLM("wide-vocab", dtype=torch.bfloat16, max_num_seqs=64, max_num_batched_tokens=512)
        assert llm.runner.graphs and measured["reserved"] == sum(llm.runner.graph_sizes) * 151936 * 2
        assert 0.98 * measured["reserved"] <= measured["held"] <= 1.02 * measured["reserved"], measured

    # ---- reliability: one request, one thread or one interrupt never costs another its output ----

    def test_nothing_a_request_carries_fails_a_step_for_the_others(self, tmp_path):
        """Randomized: one request with too many logprobs or prompt logprobs (over max_logprobs or the
        vocabulary) is refused when added, and one whose prompt holds ids the tokenizer has no bytes for
        (a hole below its last id) is scored with decoded_token None; the good requests beside it get a
        fresh engine's tokens, and step() keeps working for a good request added next to a refused one."""
        _byte_tokenizer_checkpoint(tmp_path)
        spec = json.loads((tmp_path / "tokenizer.json").read_text())  # an added token at 298: ids below it are holes
        spec["added_tokens"].append(dict(id=298, content="<|far|>", single_word=False, lstrip=False, rstrip=False,
                                         normalized=False, special=True))
        (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
        llm = LLM(str(tmp_path), dtype=torch.float32, block_size=4, max_num_seqs=8)
        hole = max(spec["model"]["vocab"].values()) + 1
        assert hole < 298 and llm.get_tokenizer().vocab_size == 299
        rng, good = random.Random(0), _prompts(5, 290, seed=3, longest=12)
        greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2)
        expected = [o.outputs[0].token_ids for o in llm.generate(good, greedy, use_tqdm=False)]
        bad_kinds = [SamplingParams(max_tokens=3, logprobs=21), SamplingParams(max_tokens=3, prompt_logprobs=300),
                     SamplingParams(max_tokens=3, logprobs=301), SamplingParams(max_tokens=3, n=2, prompt_logprobs=21)]
        for trial in range(8):
            at, kind = rng.randrange(len(good) + 1), rng.randrange(len(bad_kinds) + 1)
            prompts, params = list(good), [greedy] * len(good)
            if kind < len(bad_kinds):
                prompts.insert(at, [5, 6, 7])
                params.insert(at, bad_kinds[kind])
            else:  # accepted: its text has no bytes, its logprobs no text
                prompts.insert(at, [5, hole, 6, hole + 1])
                params.insert(at, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2, logprobs=1))
            outputs = llm.generate(prompts, params, use_tqdm=False)
            odd = outputs.pop(at)
            assert [o.outputs[0].token_ids for o in outputs] == expected, trial
            if kind < len(bad_kinds):
                assert odd.outputs[0].finish_reason == "error" and "logprobs" in odd.error
                assert odd.prompt_token_ids == [5, 6, 7]  # an error output keeps what it was given
            else:
                assert odd.outputs[0].finish_reason == "length"
                assert odd.prompt_logprobs[1][hole].decoded_token is None and len(odd.prompt_logprobs) == 4
        with pytest.raises(ValueError, match="logprobs=1000"):
            llm.add_request("bad", [5, 6, 7], SamplingParams(logprobs=1000))
        llm.add_request("good", good[0], greedy)
        final = [o for _ in range(20) if llm.has_unfinished_requests() for o in llm.step() if o.finished]
        assert [(o.request_id, o.outputs[0].token_ids) for o in final] == [("good", expected[0])]
        _assert_pool_free(llm)

    def test_detokenize_false_gives_logprobs_without_text(self, tmp_path):
        _byte_tokenizer_checkpoint(tmp_path)
        llm = LLM(str(tmp_path), dtype=torch.float32, block_size=4, max_num_seqs=4)
        params = SamplingParams(temperature=0, max_tokens=3, logprobs=2, prompt_logprobs=1, detokenize=False)
        [output] = llm.generate("the cat", params, use_tqdm=False)
        entries = [*output.outputs[0].logprobs, *output.prompt_logprobs[1:]]
        assert output.outputs[0].text == "" and all(e.decoded_token is None for d in entries for e in d.values())
        [output] = llm.generate("the cat", replace(params, detokenize=True), use_tqdm=False)
        assert all(e.decoded_token is not None for d in output.outputs[0].logprobs for e in d.values())

    def test_a_closed_stream_or_an_abort_leaves_nothing_running_for_load_weights(self):
        """The RL loop: stream rollouts, stop early, load new weights at once (no extra step()), and the
        next rollouts run on them; the same after abort() of an add_request()'s request mid-flight."""
        llm = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=8)
        params = SamplingParams(temperature=1.0, seed=1, max_tokens=30, ignore_eos=True)
        new_weights = {name: torch.randn_like(t) * 0.1 for name, t in [("model.norm.weight", llm.runner.model.norm)]}
        for output in llm.stream([[1, 2, 3], [4, 5]], params):
            if len(output.outputs[0].token_ids) >= 1 and output.request_id == "0":
                break
        assert not llm.has_unfinished_requests() and llm.in_flight is None
        llm.load_weights(new_weights)  # a dict: the commonest form
        _assert_pool_free(llm)
        llm.add_request("r", [1, 2, 3], params)
        llm.step(), llm.step()
        assert llm.in_flight is not None and llm.abort("r").outputs[0].finish_reason == "abort"
        assert not llm.has_unfinished_requests() and llm.in_flight is None
        llm.load_weights(new_weights.items())
        fresh = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=8)
        fresh.load_weights(new_weights)
        greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        assert llm.generate([[9, 8, 7]], greedy, use_tqdm=False)[0].outputs[0].token_ids == \
            fresh.generate([[9, 8, 7]], greedy, use_tqdm=False)[0].outputs[0].token_ids
        _assert_pool_free(llm)

    def test_threads_calling_generate_and_stream_each_get_their_own_outputs(self):
        import threading
        llm = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=8)
        jobs = [(_prompts(4, 512, seed=i, longest=20), SamplingParams(temperature=i % 2, seed=i, max_tokens=4 + i,
                                                                    ignore_eos=True, logprobs=1)) for i in range(4)]
        alone = [[o.outputs[0].token_ids for o in llm.generate(p, q, use_tqdm=False)] for p, q in jobs]
        results, errors = {}, []

        def run(i):
            try:
                prompts, params = jobs[i]
                for _ in range(3):
                    if i == 3:  # one thread streams: its deltas add up to its outputs
                        tokens = {}
                        for delta in llm.stream(prompts, params):
                            tokens.setdefault(delta.request_id, []).extend(delta.outputs[0].token_ids)
                        got = [tokens[request_id] for request_id in sorted(tokens, key=int)]
                    else:
                        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
                    results.setdefault(i, []).append(got)
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads) and not errors
        assert len(results) == 4 and all(results[i] == [alone[i]] * 3 for i in range(4))
        _assert_pool_free(llm)

    def test_completion_ids_never_collide_with_a_users_ids(self):
        llm = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=8)
        params = SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=3, ignore_eos=True)
        for request_id in ("1_0", "0_0", "0_1"):  # what "{i}_{id}" would have named generate()'s completions
            llm.add_request(request_id, [1, 2], SamplingParams(max_tokens=2, ignore_eos=True))
        [output] = llm.generate([[3, 4, 5]], params, use_tqdm=False)
        assert [len(c.token_ids) for c in output.outputs] == [3, 3] and output.outputs[0].finish_reason == "length"
        with pytest.raises(ValueError, match="request_id: expected a str"):
            llm.add_request(("0", 1), [1, 2])
        final = {o.request_id for _ in range(10) if llm.has_unfinished_requests() for o in llm.step() if o.finished}
        assert final == {"1_0", "0_0", "0_1"}
        _assert_pool_free(llm)

    @pytest.mark.parametrize("api", ["generate", "step"])
    def test_an_interrupt_at_any_line_loses_no_output(self, api):
        """The interrupt harness: a KeyboardInterrupt raised at the k-th line the engine's modules run
        (sys.settrace), for every k of a whole run (every 3rd in CI; STRIDE=1 for all). Afterwards step()
        returns every background request's final output exactly once, with the tokens of a run without
        interrupt; generate() again gives its prompts' tokens; no block is held."""
        stride = int(os.environ.get("INTERRUPT_STRIDE", "3"))
        background = [([1, 2, 3], 2), ([4, 5, 6, 7], 3), ([8, 9], 5)]
        prompts = [[10, 11, 12], [13, 14]]
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        llm = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=8)
        files = {os.path.abspath(m.__file__) for m in (engine, sampler, kv_cache, sys.modules["scheduler"])}
        want = {f"b{i}": llm.generate([p], replace(params, max_tokens=n), use_tqdm=False)[0].outputs[0].token_ids
                for i, (p, n) in enumerate(background)}
        want_generate = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

        def trial(k):
            """Runs the workload with an interrupt at line k (None: none); the number of lines it ran."""
            count = [0]

            def tracer(frame, event, arg):
                if frame.f_code.co_filename not in files:
                    return None
                if event == "line":
                    count[0] += 1
                    if count[0] == k:
                        raise KeyboardInterrupt(f"{frame.f_code.co_filename}:{frame.f_lineno}")
                return tracer
            finals, where = [], []
            for i, (prompt, n) in enumerate(background):
                llm.add_request(f"b{i}", prompt, replace(params, max_tokens=n))
            sys.settrace(tracer)
            try:
                if api == "generate":
                    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] \
                        == want_generate
                while llm.has_unfinished_requests():
                    finals += [o for o in llm.step() if o.finished]
            except KeyboardInterrupt as interrupt:
                where.append(str(interrupt))
            finally:
                sys.settrace(None)
            for _ in range(50):
                finals += [o for o in llm.step() if o.finished]
                if not llm.has_unfinished_requests():
                    break
            got = {o.request_id: o.outputs[0].token_ids for o in finals}
            assert len(finals) == len(got) and got == want, f"interrupt at line {k}: {where}"
            assert len(llm.scheduler.kv_cache_manager.free_queue) == llm.scheduler.kv_cache_manager.num_blocks, where
            assert not llm.output_processor.groups and not any(llm.output_processor.finals.values()), where
            _assert_pool_free(llm)
            return count[0]
        total = trial(None)
        for k in range(1, total + 1, stride):
            trial(k)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want_generate

# ==== speculative decoding (n-gram drafts) =================================================================
_SPEC = dict(method="ngram", num_speculative_tokens=4, prompt_lookup_max=4, prompt_lookup_min=2)


def _spec_workload():
    """The invariance workload plus prompts whose greedy continuations repeat (the tiny model's outputs cycle), so
    drafts are accepted and rejected, with max_tokens ending inside runs of accepted drafts."""
    prompts, params = _invariance_workload()
    repetitive = [[5, 6, 7, 8] * 6, [3, 1, 4, 1, 5, 9, 2, 6] * 3, [11, 12] * 10]
    return prompts + repetitive, params + [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
                                           for n in (29, 17, 23)]


def _fake_graphs(llm, sizes=(1, 2, 4, 8, 16)):
    """CPU stand-ins for the CUDA graphs: a replay runs the eager forward of the captured shape (padding rows,
    max_seq_len = max_model_len) into the static logits, so the padded layouts run on the CPU too. Returns the
    replays counted by rows' length."""
    runner, replays = llm.runner, Counter()

    class Replay:
        def __init__(self, size, query_len):
            self.size, self.query_len = size, query_len
            self.logits = torch.empty(size * query_len, runner.model.config.vocab_size, device=runner.device)

        def replay(self):
            replays[self.query_len] += 1
            with torch.inference_mode():
                self.logits.copy_(runner._forward(self.size * self.query_len, self.size, self.query_len,
                                                  llm.config.max_model_len, None))
    for graphs, query_len in ((runner.graphs, 1), (runner.draft_graphs, runner.draft_query_len)):
        for size in sizes:
            graphs[size] = (replay := Replay(size, query_len), replay.logits)
    return replays


def _poison_rejected_drafts(llm):
    """After each step, NaN into the K/V slots of its rejected drafts: any later read of one (by the request
    itself before it rewrites the slot, or by another request through the prefix cache) poisons its logits."""
    update, kv_caches, block_size = llm.scheduler.update, llm.runner.kv_caches, llm.config.block_size

    def poisoning_update(output, sampled_token_ids):
        drafted = [(e, list(e.request.block_ids)) for e in output.scheduled if e.draft_token_ids]
        finished = update(output, sampled_token_ids)
        for entry, blocks in drafted:
            for position in range(entry.start + len(sampled_token_ids[entry.request]),
                                  entry.start + entry.num_new_tokens):
                kv_caches[:, :, blocks[position // block_size], position % block_size] = float("nan")
        return finished
    llm.scheduler.update = poisoning_update


@pytest.fixture(scope="module")
def spec_reference(reference_outputs):
    """The speculation workload's greedy tokens without drafts, and the steps they took."""
    llm = LLM("tiny", dtype=torch.float32, **_BASE)
    outputs = [o.outputs[0].token_ids for o in llm.generate(*_spec_workload(), use_tqdm=False)]
    assert outputs[:len(reference_outputs)] == reference_outputs
    return outputs, llm.stats.steps


class TestSpeculative:
    """Speculative decoding with n-gram drafts: the same tokens, logprobs and sampled distribution as without,
    in fewer steps."""

    def test_config_is_checked_and_takes_vllm_defaults(self):
        config = EngineConfig(speculative_config=dict(method="ngram", num_speculative_tokens=3))
        assert (config.speculative_config.prompt_lookup_max, config.speculative_config.prompt_lookup_min) == (5, 5)
        config = EngineConfig(speculative_config=dict(method="ngram", num_speculative_tokens=3, prompt_lookup_max=4))
        assert config.speculative_config.prompt_lookup_min == 4
        for bad, message in [(dict(_SPEC, lookahead=2), r"unknown keys \['lookahead'\]"),
                             (dict(_SPEC, method="eagle"), "method must be 'ngram'"),
                             (dict(_SPEC, num_speculative_tokens=0), "num_speculative_tokens must be"),
                             ({"num_speculative_tokens": 2}, "method must be"),
                             (dict(_SPEC, prompt_lookup_min=5), r"prompt_lookup_min must be an int in \[1, prompt_lookup_max=4\]"),
                             (dict(_SPEC, disable_by_batch_size=True), "disable_by_batch_size must be"),
                             ("ngram", "speculative_config: unknown keys")]:
            with pytest.raises(ValueError, match=message):
                LLM("tiny", dtype=torch.float32, speculative_config=bad)

    def test_proposer_copies_what_followed_the_longest_latest_match(self):
        propose = lambda tokens, k=3, lo=2, hi=4: scheduler_module.propose_ngram_drafts(  # noqa: E731
            np.array(tokens), k, lo, hi)
        assert propose([1, 2, 3, 9, 9, 2, 3, 8, 7, 1, 2, 3]) == [9, 9, 2]  # "1 2 3" (3 tokens) beats "2 3" later
        assert propose([2, 3, 5, 2, 3, 6, 2, 3]) == [6, 2, 3]  # two equal matches: the latest
        assert propose([4, 4, 1, 2, 3, 4]) == []               # only "4": shorter than prompt_lookup_min
        assert propose([4, 4, 1, 2, 3, 4], lo=1) == [1, 2, 3]  # the latest "4"
        assert propose([7, 1, 2, 1, 2], k=5) == [1, 2, 1, 2, 1]  # past the end: the pattern goes on
        assert propose([5]) == [] and propose([5, 6]) == []

    @pytest.mark.parametrize("variant", ["async", "sync", "no-prefix-cache", "block-4", "budget-7", "preempt",
                                         "graphs"])
    def test_greedy_tokens_are_those_without_drafts(self, variant, spec_reference):
        llm = LLM("tiny", dtype=torch.float32, speculative_config=_SPEC, **{**_BASE, **_VARIANTS.get(variant, {})})
        replays = _fake_graphs(llm) if variant == "graphs" else None
        outputs = [o.outputs[0].token_ids for o in llm.generate(*_spec_workload(), use_tqdm=False)]
        expected, plain_steps = spec_reference
        assert outputs == expected
        assert llm.stats.accepted_draft_tokens > 0 and (variant != "async" or llm.stats.steps < plain_steps)
        assert llm.stats.draft_tokens > llm.stats.accepted_draft_tokens  # some were rejected too
        if variant == "graphs":  # steps with drafts replayed the draft graphs
            assert replays[llm.runner.draft_query_len] > 0 and llm.stats.graph_steps == sum(replays.values())
        _assert_pool_free(llm)

    def test_logprobs_penalties_n_and_fp8_as_without_drafts(self):
        """Logprobs (one per token, within 1e-5), prompt logprobs, penalties counting the drafts before each
        row, min_tokens, n > 1 seeded samples and an fp8 KV cache: the same as without speculation."""
        prompts = [[5, 6, 7, 8] * 5, [3, 1, 4, 1, 5, 9, 2, 6] * 2, [9, 9, 9]]
        params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2, prompt_logprobs=1),
                  SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, frequency_penalty=0.3,
                                 repetition_penalty=1.1, min_tokens=3, stop_token_ids=[5]),
                  SamplingParams(n=3, temperature=0.3, seed=7, max_tokens=20, ignore_eos=True, logprobs=0)]
        for settings in (dict(), dict(kv_cache_dtype="fp8", block_size=4)):
            runs = [LLM("tiny", dtype=torch.float32, max_num_seqs=8, **settings, **spec)
                    for spec in ({}, dict(speculative_config=_SPEC))]
            plain, drafted = (llm.generate(prompts, params, use_tqdm=False) for llm in runs)
            assert runs[1].stats.accepted_draft_tokens > 0
            for a, b in zip(plain, drafted):
                for x, y in zip(a.outputs, b.outputs):
                    assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason
                    if x.logprobs is not None:
                        assert len(y.logprobs) == len(y.token_ids)
                        for d, e in zip(x.logprobs, y.logprobs):
                            assert d.keys() == e.keys()
                            assert all(abs(d[t].logprob - e[t].logprob) < 1e-5 and d[t].rank == e[t].rank for t in d)
                if a.prompt_logprobs is not None:
                    assert [p and {t: round(v.logprob, 4) for t, v in p.items()} for p in a.prompt_logprobs] == \
                        [p and {t: round(v.logprob, 4) for t, v in p.items()} for p in b.prompt_logprobs]
            for llm in runs:
                _assert_pool_free(llm)

    def test_stops_inside_accepted_drafts_cut_there(self, tmp_path):
        """Stop strings, stop tokens and max_tokens that fall inside a run of accepted drafts: the output ends
        exactly where it ends without drafts (its text, tokens, logprobs, reasons). Weights made so greedy text
        cycles through "abcdefg!" (no attention or MLP output; lm_head maps each letter's embedding to the next
        letter), so drafts from the prompt are accepted."""
        hf = _byte_tokenizer_checkpoint(tmp_path)
        plain, drafted = (LLM(str(tmp_path), dtype=torch.float32, block_size=4, max_num_seqs=32, **spec)
                          for spec in ({}, dict(speculative_config=_SPEC)))
        letters = [plain.get_tokenizer().encoding.encode_single_token(bytes([b])) for b in b"abcdefg!"]
        weights = {name: t.detach().clone() for name, t in hf.state_dict().items()}
        for name in weights:
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                weights[name].zero_()
        weights["model.norm.weight"].fill_(1.0)
        follows = list(range(len(weights["lm_head.weight"])))  # lm_head row j: the embedding of the token before j
        for before, after in zip(letters, letters[1:] + letters[:1]):
            follows[after] = before
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"][follows]
        for llm in (plain, drafted):
            llm.load_weights(weights)
        prompts = ["abcdefg!abcdefg!ab", "cdefg!abcdefg!abcdef", "xyz g!abc"]
        greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        cases = [(prompt, replace(greedy, max_tokens=n)) for prompt in prompts for n in (2, 13)]
        cases += [(prompt, replace(greedy, stop=[stop], include_stop_str_in_output=include, logprobs=1))
                  for prompt in prompts for stop, include in (("g!a", False), ("bcd", True), ("!abcdefg!a", False))]
        cases += [(prompt, replace(greedy, stop_token_ids=[letters[i]], logprobs=0)) for prompt in prompts for i in (2, 7)]
        expected, got = (llm.generate([p for p, _ in cases], [s for _, s in cases], use_tqdm=False)
                         for llm in (plain, drafted))
        assert expected[1].outputs[0].text == "cdefg!abcdefg"  # the weights cycle as meant
        for x, y in zip(expected, got):
            x, y = x.outputs[0], y.outputs[0]
            assert (y.text, y.token_ids, y.finish_reason, y.stop_reason) == \
                (x.text, x.token_ids, x.finish_reason, x.stop_reason)
            assert y.logprobs is None or [list(d)[0] for d in y.logprobs] == y.token_ids
        # Accepted drafts ran past the stops: tokens were sampled that the outputs do not keep.
        assert drafted.stats.output_tokens > sum(len(o.outputs[0].token_ids) for o in got)
        assert drafted.stats.accepted_draft_tokens > 0 and drafted.stats.steps < plain.stats.steps
        _assert_pool_free(drafted)

    @pytest.mark.parametrize("rule", ["standard", "always accept", "resample from p"])
    def test_rejection_sampler_keeps_the_distribution(self, rule, monkeypatch):
        """Two draft positions over a 4-token vocabulary, 20,000 seeds: the first emitted token follows p0, and
        after an accepted first draft the second follows p1 (total variation < 0.02). Wrong rules must fail."""
        p0, p1 = torch.tensor([0.1, 0.3, 0.4, 0.2]), torch.tensor([0.5, 0.1, 0.1, 0.3])
        drafts, rows = [1, 3], 20000
        logits = torch.stack([p0, p1, p1]).log().repeat(rows, 1)
        params = _sampling_tensors(3 * rows)
        tokens = sampler.sample(logits, params).tolist()
        if rule == "always accept":
            monkeypatch.setattr(sampler, "accept_drafts", lambda tokens, row, drafts: drafts + tokens[row + 2:row + 3])
        if rule == "resample from p":  # accept with p(d), else a fresh draw from p itself: too much mass on d
            other = sampler.sample(logits, replace(params, seeds=params.seeds + 1)).tolist()
            monkeypatch.setattr(sampler, "accept_drafts", lambda tokens, row, drafts: (
                [drafts[0], *tokens[row + 1:row + 2]] if tokens[row] == drafts[0] else other[row:row + 1]))
        emitted = [sampler.accept_drafts(tokens, 3 * r, drafts) for r in range(rows)]
        first = torch.bincount(torch.tensor([e[0] for e in emitted]), minlength=4).float() / rows
        seconds = torch.tensor([e[1] for e in emitted if e[0] == drafts[0] and len(e) > 1])
        second = torch.bincount(seconds, minlength=4).float() / len(seconds)
        ok = (first - p0).abs().sum() / 2 < 0.02 and (second - p1).abs().sum() / 2 < 0.03
        assert ok == (rule == "standard")

    def test_seeded_samples_are_those_without_drafts(self, monkeypatch):
        """Each row draws with the noise of its output index, so a seeded request gets the very tokens it gets
        without drafts; a wrong rejection rule (always accept) shows up as different tokens."""
        prompts = [[5, 6, 7, 8] * 5, [11, 12] * 8]  # (a negative frequency penalty makes the first repeat itself)
        params = [SamplingParams(temperature=0.4, seed=11, max_tokens=24, ignore_eos=True, frequency_penalty=-0.5),
                  SamplingParams(n=2, temperature=0.4, seed=3, max_tokens=24, ignore_eos=True, presence_penalty=0.2)]
        plain = LLM("tiny", dtype=torch.float32, max_num_seqs=4)
        drafted = LLM("tiny", dtype=torch.float32, max_num_seqs=4, speculative_config=_SPEC)
        tokens = lambda llm: [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]  # noqa: E731
        expected = tokens(plain)
        assert tokens(drafted) == expected and tokens(drafted) == expected  # reproducible
        assert drafted.stats.accepted_draft_tokens > 0
        monkeypatch.setattr(engine, "accept_drafts", lambda tokens, row, drafts: tokens[row:row + 1 + len(drafts)])
        assert tokens(drafted) != expected

    def test_rejected_drafts_kv_is_never_read(self):
        """NaN in the slots of every rejected draft after its step: the outputs stay those without drafts
        (greedy), also for later requests that hit the cached prefix of an earlier one, and no cached block
        holds a NaN."""
        prompts, params = _spec_workload()
        plain = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=8)
        expected = plain.generate(prompts, params, use_tqdm=False)
        llm = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=8, speculative_config=_SPEC)
        _poison_taken_blocks(llm)
        _poison_rejected_drafts(llm)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
        # Later requests continue the earlier ones: their prompts hit the blocks that held drafts.
        followers = [o.prompt_token_ids + o.outputs[0].token_ids for o in expected]
        again = llm.generate(followers, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == [
            o.outputs[0].token_ids for o in plain.generate(followers, params, use_tqdm=False)]
        assert llm.scheduler.kv_cache_manager.num_hit_tokens > 0 and llm.stats.accepted_draft_tokens > 0
        assert llm.stats.draft_tokens > llm.stats.accepted_draft_tokens
        _assert_cached_blocks_were_written(llm)
        _assert_pool_free(llm)

    @pytest.mark.parametrize("place", ["forward", "update"])
    def test_a_failed_step_with_drafts_is_undone(self, monkeypatch, place):
        prompts, params = _spec_workload()
        expected = [o.outputs[0].token_ids for o in LLM("tiny", dtype=torch.float32, block_size=4).generate(
            prompts[-3:], params[-3:], use_tqdm=False)]
        # eager: on a GPU the repeated prompts' steps would replay graphs, and "forward" would never be called
        llm = LLM("tiny", dtype=torch.float32, block_size=4, speculative_config=_SPEC, enforce_eager=True)
        _poison_taken_blocks(llm)
        with monkeypatch.context() as patch:
            llm.generate(prompts[-3:], params[-3:], use_tqdm=False)  # the first steps: drafts in flight later
            _fail_on_second_call(patch, *_FAULT_PLACES[place], RuntimeError("injected"))
            with pytest.raises(RuntimeError):
                llm.generate(prompts[-3:], params[-3:], use_tqdm=False)
        _assert_cached_blocks_were_written(llm)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts[-3:], params[-3:], use_tqdm=False)] == expected
        _assert_pool_free(llm)

    def test_bench_reports_the_drafts(self, tmp_path, monkeypatch, capsys):
        out = tmp_path / "bench.json"
        monkeypatch.setattr(sys, "argv", ["bench.py", "--arch", "tiny", "--num-seqs", "3", "--max-input-len", "40",
                                          "--max-output-len", "24", "--speculative-ngram", "3", "--json", str(out)])
        bench.main()
        result = json.loads(out.read_text())
        _, params = bench.make_workload("default", 3, 40, 24, vocab_limit=511)
        assert result["output_tokens"] == sum(p.max_tokens for p in params)
        assert 0 <= result["drafts_accepted"] <= result["drafts_proposed"] and "mean_accepted_length" in result
        monkeypatch.setattr(sys, "argv", ["bench.py", "--arch", "tiny", "--speculative-disable-by-batch-size", "4"])
        with pytest.raises(SystemExit):
            bench.main()
        assert "argument --speculative-disable-by-batch-size: needs --speculative-ngram" in capsys.readouterr().err

    def test_no_drafts_above_disable_by_batch_size(self):
        llm = LLM("tiny", dtype=torch.float32, speculative_config=dict(_SPEC, disable_by_batch_size=2))
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        llm.generate([[5, 6, 7, 8] * 5] * 3, params, use_tqdm=False)  # three run together to the end
        assert llm.stats.draft_tokens == 0
        llm.generate([[5, 6, 7, 8] * 5] * 2, params, use_tqdm=False)
        assert llm.stats.accepted_draft_tokens > 0


# ==== fp8 weights (model.py: Fp8Linear, linear, quantize_fp8, fp8 checkpoints) ====================


_FP8_CORES = _CUDA and torch.cuda.get_device_capability() >= (8, 9)
_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _fake_quantize(x, scale=None):
    """x rounded to e4m3 and back, in float64: per row (amax / 448) or by a static scale; the tests' own rounding."""
    x = x.double()
    scale = (x.abs().amax(-1, keepdim=True) / 448).clamp(min=1e-12) if scale is None else scale
    return (x / scale).clamp(-448, 448).to(FP8).double() * scale


def _fp8_checkpoint(path, method="compressed-tensors", strategy="channel", static=False):
    """A tiny Llama in llm-compressor's FP8 format (or vLLM's quant_method "fp8"), written here: each linear weight
    e4m3 with weight_scale per channel [out, 1] or per tensor [1] (so fused q/k/v parts differ), input_scale per
    tensor if static (differing within q/k/v too). Returns the HF model in float64 with the dequantized weights and
    a hook on each linear rounding its input as our engine must: the reference."""
    hf = _hf_checkpoint(path, "LlamaForCausalLM").double()
    tensors, modules = load_file(os.path.join(path, "model.safetensors")), dict(hf.named_modules())
    for n, name in enumerate(sorted(k for k in tensors if k.endswith("proj.weight"))):
        weight, prefix = tensors[name].double(), name[: -len(".weight")]
        scale = (weight.abs().amax(1, keepdim=True) if strategy == "channel" else weight.abs().amax().reshape(1)) / 448
        tensors[name], tensors[prefix + ".weight_scale"] = (weight / scale).to(FP8), scale.float()
        modules[prefix].weight.data = tensors[name].double() * scale.float().double()
        if static:
            tensors[prefix + ".input_scale"] = torch.tensor([0.006 + 0.001 * (n % 3)])
    for name, module in modules.items():
        if name.endswith(_LINEAR_NAMES):
            # q/k/v and gate/up share their input, and so the largest of their static scales
            siblings = [name.rsplit(".", 1)[0] + "." + s for s in (
                ("q_proj", "k_proj", "v_proj") if "self_attn" in name and "o_proj" not in name
                else ("gate_proj", "up_proj") if "gate" in name or "up_proj" in name else (name.rsplit(".", 1)[1],))]
            scale = max(tensors[s + ".input_scale"].item() for s in siblings) if static else None
            module.register_forward_pre_hook(lambda _, args, scale=scale: (_fake_quantize(args[0], scale),))
    save_file(tensors, os.path.join(path, "model.safetensors"))
    fp8 = dict(type="float", num_bits=8)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = dict(quant_method="fp8", activation_scheme="static" if static else "dynamic") \
        if method == "fp8" else dict(quant_method="compressed-tensors", format="float-quantized", ignore=["lm_head"],
                                     config_groups={"group_0": dict(targets=["Linear"], weights=dict(
                                         fp8, strategy=strategy, dynamic=False, symmetric=True), input_activations=dict(
                                         fp8, strategy="tensor" if static else "token", dynamic=not static))})
    (path / "config.json").write_text(json.dumps(config))
    return hf


class TestFp8:
    """fp8 weights (quantization="fp8", fp8 checkpoints): the quantized linear against a float64 rounding of its own,
    checkpoints against HF with the same rounding hooked in, greedy invariance, bad input; on a GPU with fp8 tensor
    cores also the fast path (Triton quantization, torch._scaled_mm) against the reference."""

    @pytest.mark.parametrize("static", [False, True])
    def test_linear_equals_float64_rounding_of_weights_and_activations(self, static):
        weight, x = _randn(48, 64, dtype=torch.float32, seed=0), _randn(5, 64, dtype=torch.float32, seed=1) * 3
        weight[3] = 0.0  # a zero row: scale clamped, no NaN
        fp8 = model.Fp8Linear(weight.cpu(), static_input_scale=static)
        if static:
            fp8.input_scale.fill_(0.01)  # saturates the largest activations: clamped, not NaN
        scale = (weight.cpu().float().abs().amax(1, keepdim=True) / 448).clamp(min=1e-12)
        assert torch.equal(fp8.scale, scale) and torch.equal(fp8.weight.float(), (weight.cpu() / scale).to(FP8).float())
        for dtype in (torch.float32, torch.bfloat16):
            out = model.linear_reference(x.cpu().to(dtype), fp8)
            inputs = _fake_quantize(x.cpu().to(dtype), 0.01 if static else None)
            expected = inputs @ (fp8.weight.double() * fp8.scale.double()).t()
            assert out.dtype == dtype and not out.isnan().any()
            torch.testing.assert_close(out.double(), expected, rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-5)
        assert _relative_error(out, x.cpu().to(dtype) @ weight.cpu().to(dtype).t()) > 1e-3  # it did round

    @pytest.mark.parametrize("rows", [1, 20, 130])  # 130: three tiles of tokens (a shape _scaled_mm refuses)
    def test_fp8_matmul_sums_the_reference_products(self, rows):
        """The few-token kernel (fp8_matmul) against linear_reference's fp32 sums of the same e4m3 products, edge
        tiles cut; on a CPU through Triton's interpreter (it reads e4m3, never rounds to it)."""
        fp8 = model.Fp8Linear(_randn(200, 320, dtype=torch.float32, seed=2))
        quantized, scale = model.quantize_rows_reference(_randn(rows, 320, dtype=torch.float32, seed=3) * 2)
        bias = _randn(200, dtype=torch.bfloat16, seed=4)
        expected = (quantized.float() @ fp8.weight.float().t()) * scale * fp8.scale.t() + bias.float()
        _assert_close(model.fp8_matmul(quantized, scale, fp8, bias), expected)

    @pytest.mark.skipif(not _FP8_CORES, reason="needs a GPU with fp8 tensor cores (capability >= 8.9)")
    @pytest.mark.parametrize("rows", [1, 7, 64, 65, 300])  # up to 64: fp8_matmul; above: torch._scaled_mm
    @pytest.mark.parametrize("shape", [(256, 512), (200, 320)])  # (and tiles cut by the edges)
    def test_fast_path_equals_reference_in_bf16(self, rows, shape):
        weight = _randn(*shape, dtype=torch.bfloat16, seed=2)
        for static in (False, True):
            fp8 = model.Fp8Linear(weight, static_input_scale=static)
            fp8.input_scale is None or fp8.input_scale.fill_(0.02)
            x = _randn(rows, shape[1], dtype=torch.bfloat16, seed=3) * 2
            quantized, scale = model.quantize_rows(x, fp8.input_scale)
            expected_q, expected_scale = model.quantize_rows_reference(x, fp8.input_scale)
            torch.testing.assert_close(scale, expected_scale, rtol=1e-6, atol=0)
            assert (quantized.float() != expected_q.float()).float().mean() < 1e-3  # fp32 division: rare ties differ
            bias = _randn(shape[0], dtype=torch.bfloat16, seed=4)  # Qwen2's q/k/v bias: in the GEMM's epilogue
            for b in (None, bias):
                _assert_close(model.linear(x, fp8, b), model.linear_reference(x, fp8, b))

    @pytest.mark.skipif(not _FP8_CORES, reason="needs a GPU with fp8 tensor cores (capability >= 8.9)")
    def test_norm_and_activation_quantize_for_the_next_linear_as_quantize_rows_does(self):
        """The fused quantization (quantize_for) gives what the unfused kernel, then quantize_rows, give; a consumer
        in bf16, or one with a static input scale (linear applies it), gets the plain output."""
        fp8, static = (model.Fp8Linear(_randn(64, 320, dtype=torch.bfloat16, seed=2), static_input_scale=s)
                       for s in (False, True))
        x, residual = (_randn(9, 320, dtype=torch.bfloat16, seed=s) * 3 for s in (3, 4))
        weight, gate_up = _randn(320, dtype=torch.bfloat16, seed=5), _randn(9, 2 * 2500, dtype=torch.bfloat16, seed=6)
        residual_plain = residual.clone()
        for fused, plain in [(model.add_rms_norm(x, residual, weight, 1e-6, fp8),
                              model.add_rms_norm(x, residual_plain, weight, 1e-6)),
                             (model.silu_and_mul(gate_up, fp8), model.silu_and_mul(gate_up))]:
            expected = model.quantize_rows(plain)
            assert fused[0].dtype == FP8 and torch.equal(fused[1], expected[1])
            assert torch.equal(fused[0].float(), expected[0].float())
        assert torch.equal(residual, residual_plain)  # the residual stream is updated the same
        for consumer in (weight[None], static):
            assert torch.equal(model.silu_and_mul(gate_up, consumer), model.silu_and_mul(gate_up))

    @pytest.mark.skipif(not _FP8_CORES, reason="needs a GPU with fp8 tensor cores (capability >= 8.9)")
    def test_model_with_fast_kernels_equals_reference_kernels_in_bf16(self):
        net = random_model("tiny", torch.bfloat16, "cuda")
        model.quantize_fp8(net)
        positions, meta = _paged_batch([9, 1, 30], [0, 0, 0], [[0, 1], [2], [3, 4, 5, 6]], 8, "cuda")
        input_ids = torch.randint(0, net.config.vocab_size, (40,), device="cuda")
        kv_cache = _kv_cache(net.config, 7, 8).cuda()
        with torch.no_grad():
            fast = net(input_ids, positions, kv_cache, meta)
            net.use_triton = False  # the plain-torch LayerKernels, linear_reference among them
            reference = net(input_ids, positions, kv_cache, meta)
        # Not bf16's 1e-2: a bf16 difference before a quantization can flip an e4m3 rounding (6-12% of that element),
        # and the flips compound through the layers (H100: 6.7e-2). A scale dropped or transposed is of order 1;
        # the linear alone is held to bf16's tolerance above.
        assert not fast.isnan().any() and _relative_error(fast, reference) < 0.15

    @pytest.mark.parametrize("method,strategy,static", [("compressed-tensors", "tensor", True),
                                                        ("compressed-tensors", "channel", False), ("fp8", "tensor", False)])
    def test_fp8_checkpoint_gives_hf_logits_with_the_same_rounding(self, tmp_path, method, strategy, static):
        hf = _fp8_checkpoint(tmp_path, method, strategy, static)
        net = _load(str(tmp_path))
        assert net.config.quantization == "fp8" and isinstance(net.layers[0].qkv_proj, model.Fp8Linear)
        assert (net.layers[0].input_layernorm.dtype, net.layers[1].down_proj.weight.dtype) == (torch.float32, FP8)
        sequences = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (11, 3, 17)]
        positions, meta = _paged_batch([11, 3, 17], [0, 0, 0], [[0, 1], [2], [3, 4, 5]], 8)
        with torch.no_grad():
            logits = net(torch.cat(sequences), positions, _kv_cache(net.config, 6, 8), meta)
            expected = torch.cat([hf(s[None]).logits[0] for s in sequences])
        assert _relative_error(logits, expected) < 1e-5

    def test_online_greedy_is_invariant_to_engine_settings_and_load_weights_requantizes(self):
        prompts, params = _invariance_workload()
        runs, base = {}, None
        for kv_cache_dtype, variant in [*(("auto", v) for v in ("base", "sync", "no-prefix-cache", "block-4",
                                                                  "budget-7", "preempt")), ("fp8", "base"), ("fp8", "preempt")]:
            llm = LLM("tiny", dtype=torch.float32, quantization="fp8", kv_cache_dtype=kv_cache_dtype,
                      **{**_BASE, **_VARIANTS.get(variant, {})})
            assert llm.runner.model.layers[1].gate_up_proj.weight.dtype == FP8
            runs[kv_cache_dtype, variant] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            base = llm if (kv_cache_dtype, variant) == ("auto", "base") else base
            _assert_pool_free(llm)
            assert variant != "preempt" or llm.scheduler.num_preemptions > 0
        assert all(run == runs[kv, "base"] for (kv, _), run in runs.items()), runs
        # load_weights with float (HF-named) weights quantizes each part into its rows: the same model as quantizing
        # those weights whole at load
        other = random_model("tiny", torch.float32, _DEVICE, seed=5)  # (drawn on the engine's device, as LLM's are)
        weights = {n: t.clone() for n, t in model._checkpoint_targets(other).items() if not n.endswith("_scale")}
        base.load_weights(weights)
        fresh = LLM("tiny", dtype=torch.float32, quantization="fp8", seed=5, **_BASE)
        assert [o.outputs[0].token_ids for o in base.generate(prompts, params, use_tqdm=False)] == \
            [o.outputs[0].token_ids for o in fresh.generate(prompts, params, use_tqdm=False)]

    def test_bad_quantization_and_unsupported_checkpoint_schemes_are_refused(self, tmp_path):
        with pytest.raises(ValueError, match=r"quantization must be one of None, 'fp8', got 'int4'"):
            LLM("tiny", quantization="int4")
        path, config = _checkpoint(tmp_path), json.loads((tmp_path / "config.json").read_text())
        int4 = dict(quant_method="compressed-tensors", format="pack-quantized", config_groups={"group_0": dict(
            weights=dict(type="int", num_bits=4, strategy="group", group_size=128))})
        weight_only_fp8 = {"g": dict(weights=dict(type="float", num_bits=8, strategy="tensor"))}  # W8A16
        for spec, named in [(dict(quant_method="awq", bits=4), "quant_method 'awq'"),
                            (int4, '"type": "int", "num_bits": 4, "strategy": "group"'),
                            (dict(quant_method="fp8", weight_block_size=[128, 128]), '"weight_block_size": [128, 128]'),
                            ({**int4, "config_groups": weight_only_fp8}, '"num_bits": 8, "strategy": "tensor"}}}'),
                            ({**int4, "config_groups": {"g": dict(weights=dict(type="float", num_bits=8, strategy=
                              "channel"), input_activations=dict(type="float", num_bits=8, strategy="token",
                                                                 dynamic=True))}, "ignore": ["lm_head", "model.layers.0.mlp.down_proj"]},
                             '"ignore": ["lm_head", "model.layers.0.mlp.down_proj"]')]:
            (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": spec}))
            with pytest.raises(ValueError, match=re.escape(named)):
                _load(path)
        # fp8 tensors in a checkpoint that declares no quantization: refused, never cast into the float weights
        (tmp_path / "config.json").write_text(json.dumps(config))
        tensors = load_file(os.path.join(path, "model.safetensors"))
        tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"].to(FP8)
        save_file(tensors, os.path.join(path, "model.safetensors"))
        with pytest.raises(ValueError, match="float8_e4m3fn fits only fp8 checkpoints' linear weights"):
            _load(path)

# ==== tensor parallelism (engine.py, model.py) =====================================================

# Two tiny checkpoints: a Qwen3 with fewer KV heads than ranks (replicated) and a vocabulary two ranks split
# unevenly (padded); a tied Qwen2 (q/k/v bias) whose two KV heads split.
_TP_CHECKPOINTS = {"qwen3-one-kv-head": ("Qwen3ForCausalLM", dict(head_dim=16, num_key_value_heads=1, vocab_size=301)),
                   "qwen2-tied-bias": ("Qwen2ForCausalLM", dict(tie=True))}
# Prefix caching, chunked prefill (budget 7) and preemption (a pool too small) all at once; async on and off.
_TP_ENGINE = dict(dtype=torch.float32, block_size=4, num_blocks=12, max_model_len=48, max_num_batched_tokens=7,
                  max_num_seqs=8, enable_prefix_caching=True)
_TP_ASYNC = {"qwen3-one-kv-head": True, "qwen2-tied-bias": False}


def _tp_workload():
    shared = [5] * 9 + [9, 8]  # a shared prefix for the prefix cache
    prompts = _prompts(5, 300, seed=3, longest=30) + [shared + [1], shared + [2, 3]]
    params = [SamplingParams(temperature=0, max_tokens=3 + i % 6, ignore_eos=True, logprobs=2) for i in range(6)]
    params += [SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=5, ignore_eos=True, logprobs=0,
                              prompt_logprobs=1)]
    return prompts, params


def _assert_same_outputs(outputs, reference, tolerance=1e-5):
    """The same tokens, and logprobs (sampled and prompt) within `tolerance`."""
    for output, expected in zip(outputs, reference, strict=True):
        for completion, want in zip(output.outputs, expected.outputs, strict=True):
            assert completion.token_ids == want.token_ids
            for entry, want_entry in zip(completion.logprobs or [], want.logprobs or [], strict=True):
                assert entry.keys() == want_entry.keys()
                assert all(abs(entry[t].logprob - want_entry[t].logprob) < tolerance for t in entry)
        for entry, want_entry in zip(output.prompt_logprobs or [], expected.prompt_logprobs or [], strict=True):
            assert (entry is None) == (want_entry is None)
            assert entry is None or all(abs(entry[t].logprob - want_entry[t].logprob) < tolerance for t in entry)


def _child_processes() -> set[int]:
    """This process's child processes (Linux: /proc), zombies included; multiprocessing's resource tracker, one
    per process for good, is started first so that it is not counted as a worker left behind."""
    resource_tracker.ensure_running()
    children = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    children.add(int(pid))
        except OSError:  # it ended meanwhile
            pass
    return children


def _tp_worker_that_fails(where, *args):
    """engine.serve, in a spawned worker, failing while loading its shard or in its third step."""
    if where == "load":
        def failing_load(*_args, **_kwargs):
            raise OSError("injected: a bad shard")
        engine.load_model = failing_load
    else:
        run_model, calls = engine.ModelRunner.run_model, []

        def failing_step(self, *shape):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected: out of memory")
            return run_model(self, *shape)
        engine.ModelRunner.run_model = failing_step
    engine.serve(*args)


class _TPEngines:
    """Per checkpoint: its HF model, its path, an LLM on one rank; and, made when first asked for, one on two
    ranks. A process holds one tensor-parallel LLM at a time, so asking for another checkpoint's closes the last;
    tests that come in checkpoint order spawn each one's worker once."""

    def __init__(self, tmp_path_factory):
        self.checkpoints, self.current = {}, None
        for name, (architecture, overrides) in _TP_CHECKPOINTS.items():
            path = str(tmp_path_factory.mktemp(name))
            hf = _hf_checkpoint(path, architecture, **overrides)
            self.checkpoints[name] = (hf, path, LLM(path, **self.settings(name)))

    @staticmethod
    def settings(name):
        return dict(_TP_ENGINE, async_scheduling=_TP_ASYNC[name])

    def two(self, name):
        if self.current is not None and self.current[0] != name:
            self.close()
        if self.current is None:
            self.current = name, LLM(self.checkpoints[name][1], tensor_parallel_size=2, **self.settings(name))
        return self.current[1]

    def close(self):
        if self.current is not None:
            self.current[1].close()
            self.current = None


@pytest.fixture(scope="class")
def tp_engines(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # the workers' (as torchrun does): 3 processes share 2 cores
        engines = _TPEngines(tmp_path_factory)
        yield engines
        engines.close()


class TestTensorParallel:
    """Two ranks (gloo, spawned workers or torchrun) against one: the same tokens and logprobs; faults end every
    process; bad sizes are ValueErrors."""

    def _check_two_ranks_equal_one(self, tp_engines, name):
        _, _, one = tp_engines.checkpoints[name]
        two = tp_engines.two(name)
        prompts, params = _tp_workload()
        reference = one.generate(prompts, params, use_tqdm=False)
        outputs = two.generate(prompts, params, use_tqdm=False)
        _assert_same_outputs(outputs, reference)
        # What the settings are for really happened: preemption, prefix-cache hits, chunks of 7 tokens.
        assert two.scheduler.num_preemptions > 0 and two.scheduler.kv_cache_manager.num_hit_tokens > 0
        assert two.config.max_num_batched_tokens == 7 and two.config.async_scheduling == _TP_ASYNC[name]
        assert two.runner.model.config.num_kv_heads == 1 and len(two.runner.model.embed_tokens) < 300
        streamed = {}
        for delta in two.stream(prompts[:2], params[:2]):  # streaming: rank 0's business, the same tokens
            streamed.setdefault(delta.request_id, []).extend(delta.outputs[0].token_ids)
        assert list(streamed.values()) == [o.outputs[0].token_ids for o in reference[:2]]
        _assert_pool_free(two)

    def test_two_ranks_equal_one_with_a_kv_head_both_hold(self, tp_engines):
        self._check_two_ranks_equal_one(tp_engines, "qwen3-one-kv-head")

    def test_failed_step_is_undone_on_every_rank(self, tp_engines, monkeypatch):
        _, _, one = tp_engines.checkpoints["qwen3-one-kv-head"]
        two = tp_engines.two("qwen3-one-kv-head")
        prompts, params = _tp_workload()
        _fail_on_second_call(monkeypatch, engine, "sample", RuntimeError("injected"))  # rank 0, after the forward
        with pytest.raises(RuntimeError, match="injected"):
            two.generate(prompts, params, use_tqdm=False)
        reference = one.generate(prompts, params, use_tqdm=False)
        _assert_same_outputs(two.generate(prompts, params, use_tqdm=False), reference)

    def test_torchrun(self, tp_engines, tmp_path):
        """The same engine under torchrun: rank 0 drives, rank 1 serves inside LLM() and exits when rank 0 does."""
        _, path, one = tp_engines.checkpoints["qwen3-one-kv-head"]
        prompts, params = _tp_workload()
        script = tmp_path / "run.py"
        script.write_text(f"""import json, sys, torch
from engine import LLM, SamplingParams
llm = LLM({path!r}, tensor_parallel_size=2, **{dict(_TP_ENGINE, dtype="float32")!r})
params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
print("TOKENS", json.dumps([o.outputs[0].token_ids for o in llm.generate({prompts!r}, params, use_tqdm=False)]))
""")
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              str(script)], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(__file__))))
        assert run.returncode == 0, run.stderr[-3000:]
        [line] = [line for line in run.stdout.splitlines() if line.startswith("TOKENS")]
        reference = one.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
        assert json.loads(line.split(" ", 1)[1]) == [o.outputs[0].token_ids for o in reference]

    def test_two_ranks_equal_one_tied_with_bias_sync(self, tp_engines):
        self._check_two_ranks_equal_one(tp_engines, "qwen2-tied-bias")

    def test_load_weights_on_every_rank(self, tp_engines):
        hf, _, one = tp_engines.checkpoints["qwen2-tied-bias"]
        two = tp_engines.two("qwen2-tied-bias")
        prompts, params = _tp_workload()
        before = two.generate(prompts, params, use_tqdm=False)
        generator = torch.Generator().manual_seed(1)
        new = {name: t + 0.1 * torch.randn(t.shape, generator=generator) for name, t in hf.state_dict().items()}
        try:
            for llm in (one, two):
                llm.load_weights(new)
            outputs = two.generate(prompts, params, use_tqdm=False)
            _assert_same_outputs(outputs, one.generate(prompts, params, use_tqdm=False))
            assert [o.outputs[0].token_ids for o in outputs] != [o.outputs[0].token_ids for o in before]
            with pytest.raises(ValueError, match="unexpected tensor 'nonsense'"):  # on every rank; the group lives on
                two.load_weights([("model.norm.weight", torch.ones(64)), ("nonsense", torch.zeros(1))])
            with pytest.raises(ValueError, match="expected a floating-point torch.Tensor, got list"):
                two.load_weights([("model.norm.weight", [1.0])])
        finally:
            for llm in (one, two):
                llm.load_weights(hf.state_dict())
        _assert_same_outputs(two.generate(prompts, params, use_tqdm=False), before)

    def test_bad_sizes(self, tp_engines, monkeypatch):
        path = tp_engines.checkpoints["qwen2-tied-bias"][1]  # 4 query heads, 2 KV heads
        tp_engines.two("qwen2-tied-bias")
        children = _child_processes()
        with pytest.raises(ValueError, match="tensor_parallel_size must be an int >= 1"):
            LLM(path, tensor_parallel_size=0)
        with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide the model's num_attention_heads=4 and "
                           "intermediate_size=96, and divide its num_key_value_heads=2 or be a multiple of it"):
            LLM(path, tensor_parallel_size=3)
        with pytest.raises(ValueError, match="tensor_parallel_size=8 must divide the model's num_attention_heads=4"):
            LLM(path, tensor_parallel_size=8)
        with pytest.raises(RuntimeError, match="this process has a process group already"):  # one LLM per process
            LLM(path, tensor_parallel_size=2)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        with pytest.raises(ValueError, match="tensor_parallel_size=2: more than the 1 visible GPUs"):
            LLM(path, tensor_parallel_size=2)
        assert _child_processes() == children


    @pytest.mark.parametrize("where", ["load", "step"])
    def test_a_failing_worker_fails_the_caller_and_leaves_no_process(self, tp_engines, monkeypatch, where):
        tp_engines.close()  # (one tensor-parallel LLM per process)
        path = tp_engines.checkpoints["qwen3-one-kv-head"][1]
        children = _child_processes()
        monkeypatch.setattr(engine, "serve", functools.partial(_tp_worker_that_fails, where))
        prompts, params = _tp_workload()
        error = "tensor parallel rank 1 failed: " + ("OSError: injected: a bad shard" if where == "load"
                                                    else "RuntimeError: injected: out of memory")
        if where == "load":
            with pytest.raises(RuntimeError, match=error):
                LLM(path, tensor_parallel_size=2, **_TP_ENGINE)
        else:
            llm = LLM(path, tensor_parallel_size=2, **_TP_ENGINE)
            with pytest.raises(RuntimeError, match=error):
                llm.generate(prompts, params, use_tqdm=False)
            with pytest.raises(RuntimeError, match=error):  # the next call fails at once
                llm.generate(prompts, params, use_tqdm=False)
        assert _child_processes() == children


class TestBench:
    """bench.py's command line on the tiny model: the tokens it reports against its workload; bad flags."""

    def test_bench_runs_on_cpu(self, tmp_path, monkeypatch):
        out = tmp_path / "bench.json"
        monkeypatch.setattr("sys.argv", ["bench.py", "--arch", "tiny", "--max-num-seqs", "8", "--num-seqs", "4", "--max-input-len", "120", "--max-output-len",
                                         "8", "--json", str(out)])
        bench.main()
        result = json.loads(out.read_text())
        _, params = bench.make_workload("default", 4, 120, 8, vocab_limit=511)
        assert result["output_tokens"] == sum(p.max_tokens for p in params)

    @pytest.mark.parametrize("max_input_len", ["64", "1"])
    def test_bench_runs_with_short_prompts(self, monkeypatch, capsys, max_input_len):
        monkeypatch.setattr(sys, "argv", ["bench.py", "--arch", "tiny", "--num-seqs", "2",
                                          "--max-input-len", max_input_len, "--max-output-len", "4"])
        bench.main()
        assert "output_tokens_per_s" in capsys.readouterr().out

    @pytest.mark.parametrize("flag, value, says", [
        ("--num-seqs", "0", ">= 1"), ("--block-size", "-16", ">= 1"), ("--gpu-memory-utilization", "1.5", "(0, 1]"),
        ("--logprobs", "513", "vocabulary size, 512"), ("--logprobs", "-1", "vocabulary size, 512"),
        ("--json", "{tmp}/missing/out.json", "directory is missing"),
        ("--plot", "{tmp}/missing/itl.png", "directory is missing"), ("--model", "{tmp}", "config.json not found"),
        ("--compare", "--no-prefix-caching", "prefix caching is off already"),
        ("--through-server", "--latency", "replays an online workload's requests")])
    def test_bench_rejects_bad_flag_naming_it_before_any_run(self, tmp_path, monkeypatch, capsys, flag, value, says):
        monkeypatch.setattr(sys, "argv", ["bench.py", "--arch", "tiny", "--workload", "short", "--num-seqs", "2",
                                          "--max-output-len", "4", flag, value.format(tmp=tmp_path)])
        monkeypatch.setattr(bench, "LLM", None)  # an engine built before the check fails the test
        with pytest.raises(SystemExit) as exit_:
            bench.main()
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"argument {flag}:" in err and says in err

    @pytest.mark.parametrize("workload", bench.WORKLOADS + ["fp8"])
    def test_compare_reruns_a_different_configuration(self, tmp_path, monkeypatch, workload):
        """With no flag set for it: mixed's first run gets a budget below its longest prompt, the rerun one as large."""
        argv = ["bench.py", "--arch", "tiny", "--num-seqs", "2", "--max-input-len", "24", "--max-output-len", "2",
                "--compare", "--json", str(tmp_path / "out.json")]
        monkeypatch.setattr(sys, "argv", argv + (["--kv-cache-dtype", "fp8"] if workload == "fp8" else
                                                 ["--workload", workload]))
        bench.main()
        result = json.loads((tmp_path / "out.json").read_text())
        names = ("max_num_batched_tokens", "prefix_caching", "kv_cache_dtype")
        assert [result[n] for n in names] != [result["compare"][n] for n in names]
        assert result["output_tokens"] == result["compare"]["output_tokens"]

    def test_bench_fits_the_workload_to_a_short_model_context(self, tmp_path, monkeypatch, capsys):
        _hf_checkpoint(tmp_path, "LlamaForCausalLM", max_position_embeddings=48)
        argv = ["bench.py", "--model", str(tmp_path), "--num-seqs", "3", "--max-input-len", "100", "--max-output-len",
                "20", "--json", str(tmp_path / "out.json")]
        monkeypatch.setattr(sys, "argv", argv)
        bench.main()  # 100 + 20 tokens do not fit in 48: the prompts are cut to 28
        assert "--max-input-len 100 -> 28, --max-output-len 20 -> 20" in capsys.readouterr().out
        _, params = bench.make_workload("default", 3, 28, 20, vocab_limit=299)
        assert json.loads((tmp_path / "out.json").read_text())["output_tokens"] == sum(p.max_tokens for p in params)
        monkeypatch.setattr(sys, "argv", argv + ["--workload", "shared-prefix"])  # 64 suffix tokens never fit
        with pytest.raises(SystemExit):
            bench.main()
        assert "argument --workload: shared-prefix needs at least 66 tokens" in capsys.readouterr().err

    def test_timeline_buckets_every_step_of_the_run(self, tmp_path, monkeypatch):
        out = tmp_path / "bench.json"
        monkeypatch.setattr(sys, "argv", ["bench.py", "--arch", "tiny", "--num-seqs", "40", "--max-num-seqs", "40",
                                          "--max-input-len", "30", "--max-output-len", "140", "--timeline",
                                          "--json", str(out)])
        bench.main()
        result = json.loads(out.read_text())
        rows = result["timeline"]
        # the prompts' step, then 40 decoding, then fewer (outputs of 100-140 tokens)
        assert [row["requests"] for row in rows] == ["1-16", "17-32", "33-64", "with prefill"]
        assert rows[-1]["steps"] == 1
        assert sum(row["steps"] for row in rows) == result["steps"]
        assert sum(row["seconds"] for row in rows) == pytest.approx(result["seconds"], abs=0.01)

    def test_latency_times_every_decode_step_of_one_request(self, tmp_path, monkeypatch):
        out = tmp_path / "bench.json"
        monkeypatch.setattr(sys, "argv", ["bench.py", "--arch", "tiny", "--latency", "--max-input-len", "40",
                                          "--max-output-len", "50", "--json", str(out)])
        bench.main()
        result = json.loads(out.read_text())
        # 50 tokens: the first comes with the prompt, then 49 one-token steps, contexts 41 to 40 + 49
        assert result["steps"] == 49 and result["context"] == "41-89" and result["ms_per_step"] > 0

    def test_gpu_busy_fraction_is_a_share_of_the_wall_time(self, tmp_path, monkeypatch):
        out = tmp_path / "bench.json"
        monkeypatch.setattr(sys, "argv", ["bench.py", "--arch", "tiny", "--workload", "short", "--num-seqs", "64",
                                          "--json", str(out)])
        bench.main()
        result = json.loads(out.read_text())
        if _CUDA:  # one span per step, inside the run's wall time
            assert 0 < result["gpu_busy_fraction"] <= 1
        else:
            assert "gpu_busy_fraction" not in result and bench.record_gpu_spans(LLM("tiny", max_num_seqs=4)) == []

    def test_roofline_counts_every_matmul_weight(self):
        """step_limits' FLOPs of one token equal 2 x the model's matmul weights (lm_head included)."""
        llm = LLM("tiny", dtype=torch.float32, max_num_seqs=4)
        model, c = llm.runner.model, llm.runner.model.config
        weights = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and name != "embed_tokens")
        weights += c.vocab_size * c.hidden_size  # tied: lm_head is the embedding
        _, roofline = bench.step_limits(llm, (0, 1, 0, 1, 1, 0), bandwidth=float("inf"), flops_rate=1.0)
        assert roofline == 2 * weights
        _, with_attention = bench.step_limits(llm, (0, 1, 0, 1, 1, 10), bandwidth=float("inf"), flops_rate=1.0)
        assert with_attention - roofline == 4 * c.num_layers * c.num_q_heads * c.head_dim * 10  # QK and PV
        # Phases add up: 4 prompt tokens are FLOP-bound in the matmuls, a 1,000-token context's
        # decode is byte-bound in attention; the step needs both, one after the other.
        _, matmuls = bench.step_limits(llm, (0, 2, 0, 4, 1, 0), bandwidth=float("inf"), flops_rate=1.0)
        weights_only, _ = bench.step_limits(llm, (0, 2, 0, 4, 1, 0), bandwidth=1.0, flops_rate=1.0)
        byte_limit, mixed = bench.step_limits(llm, (0, 2, 1000, 4, 1, 0), bandwidth=1.0, flops_rate=1.0)
        assert matmuls > weights_only and mixed == matmuls + (byte_limit - weights_only)
        steps, start = bench.record_steps(llm), time.perf_counter()  # the GPU's table, with made-up ceilings
        llm.generate([[1, 2, 3]] * 3, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        decode, prefill = bench.timeline(llm, steps, start, bandwidth=1e12, flops_rate=1e12)
        assert (decode["steps"], prefill["steps"]) == (3, 1) and len(steps) == 4
        assert decode["share_of_lost_time"] + prefill["share_of_lost_time"] == pytest.approx(1.0, abs=0.002)
        assert prefill["roofline_seconds"] >= prefill["limit_seconds"] and decode["fraction"] is not None

    def test_workloads_are_deterministic_and_have_the_lengths_they_claim(self):
        for name in bench.WORKLOADS:
            first = bench.make_workload(name, 64, 400, 600, vocab_limit=100, seed=3)
            assert first == bench.make_workload(name, 64, 400, 600, vocab_limit=100, seed=3)
            assert first != bench.make_workload(name, 64, 400, 600, vocab_limit=100, seed=4)
        prompts, params = bench.make_workload("chat", 64, 400, 600, vocab_limit=100)
        assert all(p[:400] == prompts[0][:400] and 32 <= len(p) - 400 <= 256 for p in prompts)  # shared system prompt
        assert all(128 <= sp.max_tokens <= 512 for sp in params)
        prompts, params = bench.make_workload("mixed", 640, 4000, 600, vocab_limit=100)
        documents = [len(p) for p in prompts if len(p) > 256]
        assert all(1000 <= n <= 4000 for n in documents) and 20 <= len(documents) <= 70  # about 1 in 16
        assert all(32 <= len(p) <= 256 for p in prompts if len(p) <= 256)
        prompts, params = bench.make_workload("short", 10, 400, 600, vocab_limit=100)
        assert {len(p) for p in prompts} == {16} and {sp.max_tokens for sp in params} == {16}

    def test_arrivals_are_a_poisson_process_of_the_rate(self):
        times = bench.arrival_times(20000, request_rate=50.0, seed=1)
        gaps = [b - a for a, b in zip([0.0] + times, times)]
        assert all(gap > 0 for gap in gaps) and times == bench.arrival_times(20000, 50.0, seed=1)
        assert sum(gaps) / len(gaps) == pytest.approx(1 / 50, rel=0.03)
        assert sum(gap > 2 / 50 for gap in gaps) / len(gaps) == pytest.approx(math.exp(-2), abs=0.01)  # exponential
        assert bench.arrival_times(3, None) == [0.0, 0.0, 0.0]

    def test_serving_streams_every_token_after_its_arrival(self):
        llm = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=8)
        prompts, params = bench.make_workload("mixed", 12, 120, 20, vocab_limit=500)
        arrivals = bench.arrival_times(12, request_rate=400.0)
        token_times, seconds = bench.serve(llm, prompts, params, arrivals)
        assert [len(times) for times in token_times] == [sp.max_tokens for sp in params]
        assert all(arrival < times[0] and times == sorted(times) and times[-1] <= seconds
                   for arrival, times in zip(arrivals, token_times))
        table = bench.latency_table(token_times, arrivals, ["x"] * 12)
        ttft = sorted(times[0] - arrival for arrival, times in zip(arrivals, token_times))
        assert table["x"]["ttft_ms_p50_p90_p99"][0] == round(1e3 * ttft[6], 2) and table["x"]["requests"] == 12
        _assert_pool_free(llm)

    def test_multiturn_chat_sends_each_turn_after_the_last_with_the_whole_conversation(self):
        llm = LLM("tiny", dtype=torch.float32, block_size=4, max_num_seqs=8)
        prompts, params = bench.make_workload("chat-multiturn", 8, 40, 12, vocab_limit=500)
        questions = [list(p) for p in prompts]
        assert all(len(p) - 40 <= 256 if i % bench.TURNS == 0 else len(p) <= 256 for i, p in enumerate(prompts))
        arrivals = bench.arrival_times(8, None)
        next_turn = bench.follow_ups("chat-multiturn", 8)
        assert next_turn == {0: 1, 1: 2, 2: 3, 4: 5, 5: 6, 6: 7}
        before = llm.scheduler.kv_cache_manager.num_hit_tokens
        token_times, _ = bench.serve(llm, prompts, params, arrivals, next_turn)
        for i, j in next_turn.items():  # turn j's prompt: turn i's prompt, its answer, then j's own question
            answer_len = len(prompts[j]) - len(prompts[i]) - len(questions[j])
            assert prompts[j][:len(prompts[i])] == prompts[i] and prompts[j][-len(questions[j]):] == questions[j]
            assert answer_len == params[i].max_tokens == len(token_times[i])
            assert arrivals[j] >= token_times[i][-1] and token_times[j][0] > arrivals[j]
        assert llm.scheduler.kv_cache_manager.num_hit_tokens - before > 3 * 40  # the conversations' prefixes were reused
        _assert_pool_free(llm)

    def test_plot_draws_both_runs(self, tmp_path, monkeypatch, capsys):
        pytest.importorskip("matplotlib")
        png = tmp_path / "itl.png"
        argv = ["bench.py", "--arch", "tiny", "--workload", "mixed", "--num-seqs", "12", "--max-input-len", "300",
                "--max-output-len", "6", "--request-rate", "500", "--max-num-batched-tokens", "32", "--compare"]
        monkeypatch.setattr(sys, "argv", argv + ["--plot", str(png), "--json", str(tmp_path / "out.json")])
        bench.main()
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000
        assert "itl_points" not in (tmp_path / "out.json").read_text()  # the points are drawn, not printed
        monkeypatch.setattr(sys, "argv", ["bench.py", "--arch", "tiny", "--plot", str(png)])
        with pytest.raises(SystemExit):
            bench.main()
        assert "online workload" in capsys.readouterr().err

    def test_compare_reruns_mixed_with_one_shot_prefill(self, tmp_path, monkeypatch):
        out = tmp_path / "bench.json"
        monkeypatch.setattr(sys, "argv", ["bench.py", "--arch", "tiny", "--workload", "mixed", "--num-seqs", "20",
                                          "--max-input-len", "300", "--max-output-len", "8", "--request-rate", "500",
                                          "--max-num-batched-tokens", "32", "--compare", "--json", str(out)])
        bench.main()
        result = json.loads(out.read_text())
        assert result["max_num_batched_tokens"] == 32 and result["compare"]["max_num_batched_tokens"] == 300
        assert result["output_tokens"] == result["compare"]["output_tokens"]
        assert set(result["latency"]) <= {"chat", "document"} and result["request_rate"] == 500


# ==== server.py ===================================================================================

_SERVER_ARGS = dict(dtype=torch.float32, block_size=8, num_blocks=512, max_num_seqs=24, max_num_batched_tokens=256)


def _serve(llm, name):
    """server.py serving `llm` on 127.0.0.1 (a free port): its engine loop here, its HTTP front end in a process of
    its own, as `python server.py` runs them. (server.Server, port), once it takes requests."""
    import server
    running = server.Server(llm, name, log_level="warning")
    return running, running.port


def _stop(running):
    running.close()
    assert not running.frontend.is_alive() and not running.engine.thread.is_alive()


def _http(port, method, path, body=None):
    """A raw HTTP request (a body the openai client would not send): (status, JSON body)."""
    import http.client
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _wait_until_idle(llm, timeout=60):
    deadline = time.monotonic() + timeout
    while llm.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not llm.has_unfinished_requests()


def _streamed(stream):
    """Texts, finish reasons and logprob entries by choice index, and the usage, of an openai stream."""
    texts, finish, logprobs, usage = {}, {}, {}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            delta = choice.text if hasattr(choice, "text") else choice.delta.content
            texts[choice.index] = texts.get(choice.index, "") + (delta or "")
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
            if choice.logprobs is not None and hasattr(choice.logprobs, "content"):
                logprobs.setdefault(choice.index, []).extend(choice.logprobs.content)
    return texts, finish, logprobs, usage


def _usage_of(outputs):
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    return prompt, sum(len(c.token_ids) for o in outputs for c in o.outputs)


class TestServer:
    """server.py: a real uvicorn server on 127.0.0.1 with a tiny checkpoint, driven by the official openai client;
    what it answers against LLM.generate / LLM.chat with the same SamplingParams."""

    @pytest.fixture(scope="class")
    def served(self, request, chat_checkpoint):
        """(openai client, the server's LLM, a reference LLM of the same checkpoint, port): one server per class
        (the class's `running`)."""
        import openai
        path, _ = chat_checkpoint
        llm = LLM(path, **_SERVER_ARGS)
        running, port = _serve(llm, "tiny-chat")
        request.cls.running = running
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        yield client, llm, LLM(path, **_SERVER_ARGS), port
        client.close()
        _stop(running)

    def test_the_online_defaults_reach_the_engine_unless_a_flag_overrides_them(self):
        import server
        _, args = server.parse_args(["--model", "m"])
        assert args == server.SERVER_DEFAULTS == {"max_num_batched_tokens": 4096, "budget_counts_attention": True}
        _, args = server.parse_args(["--model", "m", "--no-budget-counts-attention", "--max-num-batched-tokens", "8"])
        assert args == {"max_num_batched_tokens": 8, "budget_counts_attention": False}
        _, args = server.parse_args(["--model", "m", "--tensor-parallel-size", "2", "--speculative-config",
                                     '{"method": "ngram", "num_speculative_tokens": 3}'])
        assert args == dict(server.SERVER_DEFAULTS, tensor_parallel_size=2,
                            speculative_config={"method": "ngram", "num_speculative_tokens": 3})

    @pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
    def test_completions_equal_generate(self, served, stream):
        client, _, reference, _ = served
        cases = [  # (prompt as sent, SamplingParams): greedy, seeded n > 1, a stop string, id prompts
            (["the cat sat", "a dog ate the"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)),
            ("hello user", SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=6)),
            ("the mat", SamplingParams(temperature=0.8, seed=3, max_tokens=12, stop=["hat", "zz"])),
            ([[5, 6, 7, 8], [9, 10]], SamplingParams(temperature=0, top_k=3, max_tokens=5, min_tokens=2)),
        ]
        for prompt, params in cases:
            outputs = reference.generate(prompt, params, use_tqdm=False)
            fields = dict(n=params.n, temperature=params.temperature, seed=params.seed, max_tokens=params.max_tokens,
                          stop=params.stop or None)
            extra = dict(ignore_eos=params.ignore_eos, top_k=params.top_k, min_tokens=params.min_tokens)
            response = client.completions.create(model="tiny-chat", prompt=prompt, stream=stream, extra_body=extra,
                                                 stream_options={"include_usage": True} if stream else None, **fields)
            if stream:
                texts, finish, _, usage = _streamed(response)
            else:
                texts = {c.index: c.text for c in response.choices}
                finish, usage = {c.index: c.finish_reason for c in response.choices}, response.usage
            expected = [c for o in outputs for c in o.outputs]
            assert [texts[i] for i in range(len(expected))] == [c.text for c in expected]
            assert [finish[i] for i in range(len(expected))] == [c.finish_reason for c in expected]
            assert (usage.prompt_tokens, usage.completion_tokens) == _usage_of(outputs)
        assert reference.generate("the mat", cases[2][1], use_tqdm=False)[0].outputs[0].stop_reason == "hat"

    @pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
    def test_return_token_ids_are_those_of_generate(self, served, stream):
        """vLLM's return_token_ids: each choice carries its prompt's ids (once) and its completion's (in a stream,
        each chunk the new ones)."""
        client, _, reference, _ = served
        output = reference.generate("the cat sat", SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=7),
                                    use_tqdm=False)[0]
        response = client.completions.create(model="tiny-chat", prompt="the cat sat", n=2, temperature=1.0, seed=5,
                                             max_tokens=7, stream=stream, extra_body={"return_token_ids": True})
        ids, prompts = {0: [], 1: []}, {0: [], 1: []}
        for chunk in response if stream else [response]:
            for choice in chunk.choices:
                ids[choice.index] += choice.token_ids
                prompts[choice.index] += getattr(choice, "prompt_token_ids", None) or []
        assert [ids[0], ids[1]] == [c.token_ids for c in output.outputs]
        assert prompts == {0: output.prompt_token_ids, 1: output.prompt_token_ids}

    def test_a_stream_behind_the_engine_gets_its_tokens_merged(self, served):
        """A front end slower than the engine's steps (its process stopped for 0.5 s after the first chunk) sends the
        newest output it has: fewer chunks than tokens, with the same text and ids."""
        import signal
        client, _, reference, _ = served
        expected = reference.generate("the cat sat", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                                      use_tqdm=False)[0].outputs[0]
        frontend = self.running.frontend
        chunks = []
        for chunk in client.completions.create(model="tiny-chat", prompt="the cat sat", max_tokens=40, temperature=0,
                                               stream=True, extra_body={"return_token_ids": True, "ignore_eos": True}):
            chunks += chunk.choices
            if len(chunks) == 1:
                os.kill(frontend.pid, signal.SIGSTOP)
                time.sleep(0.5)  # the engine goes on: its outputs wait in the pipe
                os.kill(frontend.pid, signal.SIGCONT)
        assert "".join(c.text for c in chunks) == expected.text
        assert sum((c.token_ids for c in chunks), []) == expected.token_ids
        assert len(chunks) < len(expected.token_ids) / 2  # without merging: a chunk a token

    @pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
    def test_chat_equals_llm_chat(self, served, stream):
        client, _, reference, _ = served
        conversation = [{"role": "system", "content": "the cat"}, {"role": "user", "content": "a dog ate the hat"}]
        parts = [{"role": "system", "content": [{"type": "text", "text": "the cat"}]}, conversation[1]]
        for messages, params, extra in [
                (conversation, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), {}),
                (parts, SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=6, stop=["e"]), {}),
                (conversation + [{"role": "assistant", "content": "the"}], SamplingParams(temperature=0, max_tokens=4),
                 dict(continue_final_message=True, add_generation_prompt=False))]:
            [output] = reference.chat(messages, params, use_tqdm=False, **extra)
            response = client.chat.completions.create(
                model="tiny-chat", messages=messages, n=params.n, temperature=params.temperature, seed=params.seed,
                max_completion_tokens=params.max_tokens, stop=params.stop or None, stream=stream,
                stream_options={"include_usage": True} if stream else None,
                extra_body=dict(extra, ignore_eos=params.ignore_eos))
            if stream:
                texts, finish, _, usage = _streamed(response)
            else:
                texts = {c.index: c.message.content for c in response.choices}
                finish, usage = {c.index: c.finish_reason for c in response.choices}, response.usage
                assert {c.message.role for c in response.choices} == {"assistant"}
            assert [texts[i] for i in range(params.n)] == [c.text for c in output.outputs]
            assert [finish[i] for i in range(params.n)] == [c.finish_reason for c in output.outputs]
            assert (usage.prompt_tokens, usage.completion_tokens) == _usage_of([output])

    def test_logprobs_and_echo_equal_the_engines(self, served):
        client, _, reference, _ = served
        params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3, prompt_logprobs=3)
        [output] = reference.generate("the cat sat", params, use_tqdm=False)
        completion = output.outputs[0]
        [choice] = client.completions.create(model="tiny-chat", prompt="the cat sat", max_tokens=5, temperature=0,
                                             logprobs=3, echo=True, extra_body=dict(ignore_eos=True)).choices
        entries = output.prompt_logprobs + completion.logprobs  # the prompt's first has None
        tokens = output.prompt_token_ids + completion.token_ids
        assert choice.text == output.prompt + completion.text
        assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
        pairs = list(zip(tokens, entries, strict=True))[1:]
        assert choice.logprobs.token_logprobs[1:] == pytest.approx([e[t].logprob for t, e in pairs], abs=1e-5)
        assert choice.logprobs.tokens[1:] == [e[t].decoded_token for t, e in pairs]
        for top, entry in zip(choice.logprobs.top_logprobs[1:], entries[1:], strict=True):
            assert top == pytest.approx({e.decoded_token: e.logprob for e in entry.values()}, abs=1e-5)
        chunks = client.completions.create(model="tiny-chat", prompt="the cat sat", max_tokens=5, temperature=0,
                                           logprobs=3, stream=True, extra_body=dict(ignore_eos=True))  # no echo
        assert [p for c in chunks for p in c.choices[0].logprobs.token_logprobs] == pytest.approx(
            [e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs, strict=True)], abs=1e-5)
        [chat] = reference.chat([{"role": "user", "content": "hello"}],
                                replace(params, logprobs=2, prompt_logprobs=None), use_tqdm=False)
        _, _, streamed, _ = _streamed(client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0,
            logprobs=True, top_logprobs=2, stream=True, extra_body=dict(ignore_eos=True)))
        for got, token, entry in zip(streamed[0], chat.outputs[0].token_ids, chat.outputs[0].logprobs, strict=True):
            assert got.token == entry[token].decoded_token
            assert got.logprob == pytest.approx(entry[token].logprob, abs=1e-5)
            top = sorted((e for e in entry.values() if e.rank <= 2), key=lambda e: e.rank)
            assert [(t.token, t.logprob) for t in got.top_logprobs] == [
                (e.decoded_token, pytest.approx(e.logprob, abs=1e-5)) for e in top]

    def test_64_concurrent_streams_each_get_their_whole_output(self, served):
        import asyncio
        import openai
        _, _, reference, port = served
        words = "the cat sat on the mat a dog ate the hat hello user".split()
        prompts = [" ".join(words[i % 7: i % 7 + 1 + i % 5]) for i in range(64)]
        params = [SamplingParams(temperature=0, max_tokens=2 + i % 9, ignore_eos=True) for i in range(64)]
        expected = reference.generate(prompts, params, use_tqdm=False)

        async def one(client, i):
            stream = await client.completions.create(model="tiny-chat", prompt=prompts[i], max_tokens=2 + i % 9,
                                                     temperature=0, stream=True, extra_body=dict(ignore_eos=True),
                                                     stream_options={"include_usage": True})
            text, usage = "", None
            async for chunk in stream:
                text += "".join(choice.text for choice in chunk.choices)
                usage = chunk.usage or usage
            return text, usage.completion_tokens

        async def all_of_them():
            async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                                          max_retries=0) as client:
                return await asyncio.gather(*(one(client, i) for i in range(64)))
        got = asyncio.run(all_of_them())
        assert got == [(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in expected]

    def test_a_client_that_goes_away_aborts_its_request_and_frees_its_blocks(self, served):
        import socket
        client, llm, _, port = served
        kv = llm.scheduler.kv_cache_manager
        _wait_until_idle(llm)
        free, produced = len(kv.free_queue), llm.stats.output_tokens
        stream = client.completions.create(model="tiny-chat", prompt="the cat sat", max_tokens=900, temperature=0,
                                           stream=True, extra_body=dict(ignore_eos=True))
        assert len([chunk for _, chunk in zip(range(3), stream)]) == 3
        stream.close()
        _wait_until_idle(llm)
        assert llm.stats.output_tokens - produced < 900 and len(kv.free_queue) == free  # it stopped early
        # Not streaming: a client that leaves while its whole answer is being made.
        body = json.dumps(dict(prompt="a dog", max_tokens=900, temperature=0, ignore_eos=True)).encode()
        produced = llm.stats.output_tokens
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 60
            while llm.stats.output_tokens == produced and time.monotonic() < deadline:
                time.sleep(0.01)
        _wait_until_idle(llm)
        assert 0 < llm.stats.output_tokens - produced < 900 and len(kv.free_queue) == free

    @pytest.mark.parametrize("method, path, body, status, message", [
        ("POST", "/v1/completions", b'{"prompt": "the", ', 400, "not valid JSON"),
        ("POST", "/v1/completions", b'{"prompt": "the", "temperature": -1}', 400, "SamplingParams.temperature must be"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "n": "two"}', 400,
         "SamplingParams.n must be"),
        ("POST", "/v1/completions", json.dumps({"prompt": [5] * 1100}).encode(), 400, "max_model_len"),
        ("POST", "/v1/completions", b'{"prompt": "the", "model": "gpt-4"}', 400, "The model `gpt-4` does not exist"),
        ("POST", "/v1/completions", b'{"prompt": "the", "logprobs": 21}', 400, "logprobs must be at most 20"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": true, '
         b'"top_logprobs": 21, "stream": true}', 400, "top_logprobs must be at most 20"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400,
         "content part type 'image_url' is not supported"),
        ("POST", "/v1/chat/completions", b'{"messages": "hello"}', 400, "a conversation is a non-empty list"),
        ("POST", "/v1/completions", b'{"prompt": 5}', 400, "prompt: expected a string, a list of token ids"),
        ("GET", "/v1/nothing", None, 404, "Not Found"),
        ("GET", "/v1/completions", None, 405, "Method Not Allowed"),
    ], ids=["bad-json", "bad-value", "bad-type", "too-long", "unknown-model", "logprobs-cap", "top-logprobs-cap",
            "image-part", "string-messages", "bad-prompt", "no-route", "wrong-method"])
    def test_errors_have_openais_shape(self, served, method, path, body, status, message):
        _, llm, _, port = served
        got, answer = _http(port, method, path, body)
        assert got == status and set(answer) == {"error"}
        assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["code"] == status
        assert message in answer["error"]["message"]
        _wait_until_idle(llm)  # nothing of it stays queued

    @pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
    def test_a_dead_engine_loop_gives_503_and_shutdown_leaves_no_thread_or_process(self):
        import multiprocessing
        llm = LLM("tiny", dtype=torch.float32, max_num_seqs=4, num_blocks=64, max_model_len=256)
        before, processes = set(threading.enumerate()), set(multiprocessing.active_children())  # (the LLM's own)
        running, port = _serve(llm, "tiny")
        assert _http(port, "POST", "/v1/completions", b'{"prompt": [1, 2, 3], "max_tokens": 2}')[0] == 200

        def broken_step():  # an OSError (as TimeoutError is): the loop must not take it for the pipe's end
            raise TimeoutError("the device fell over")
        llm.step = broken_step
        for path, body in [("/v1/completions", b'{"prompt": [1, 2, 3]}'), ("/health", None),
                           ("/v1/completions", b'{"prompt": [4, 5]}')]:  # in flight when it died; then after
            status, answer = _http(port, "POST" if body else "GET", path, body)
            assert status == 503 and "the device fell over" in answer["error"]["message"]
        _stop(running)
        assert set(threading.enumerate()) == before and set(multiprocessing.active_children()) == processes

    def test_a_front_end_that_does_not_start_in_time_is_an_error_and_leaves_nothing(self, monkeypatch):
        import multiprocessing
        import server
        llm = LLM("tiny", dtype=torch.float32, max_num_seqs=4, num_blocks=64, max_model_len=256)
        before, processes = set(threading.enumerate()), set(multiprocessing.active_children())
        monkeypatch.setattr(server, "STARTUP_TIMEOUT", 0.01)  # (its imports alone take longer)
        with pytest.raises(RuntimeError, match="did not start"):
            server.Server(llm, "tiny")
        assert set(threading.enumerate()) == before and set(multiprocessing.active_children()) == processes

    def test_the_pipe_carries_whole_messages_under_an_event_loop_that_makes_watched_fds_non_blocking(self):
        """uvloop (uvicorn's loop where installed, as on the GPU host) sets an fd it watches non-blocking, as libuv
        does; a job or an output larger than the socket's buffer then went, or came, in part and the stream broke
        (runs through the server hung). Here a loop that does the same, a 2 MB prompt that the engine's side reads
        late, and a 2 MB output that it writes in two parts: both arrive whole."""
        import asyncio
        import struct
        import server
        from multiprocessing.connection import Connection
        from multiprocessing.reduction import ForkingPickler

        class NonBlockingWatches(asyncio.SelectorEventLoop):
            def add_reader(self, fd, callback, *args):
                os.set_blocking(fd if isinstance(fd, int) else fd.fileno(), False)
                return super().add_reader(fd, callback, *args)

        ours, theirs = socket.socketpair()
        engine_end, client = Connection(ours.detach()), server.EngineClient(Connection(theirs.detach()))
        prompt = list(range(400_000))
        output = engine.RequestOutput("r-0", None, prompt, None, [engine.CompletionOutput(0, "x", [7], None, None,
                                                                                          "length")], True)

        def engine_side():
            time.sleep(0.3)  # the front end's write fills the socket's buffer first
            job = engine_end.recv()
            assert job[:2] == ("add", ["r-0"]) and job[2] == [prompt]
            engine_end.send(([("r-0", None)], [], None))
            message = ForkingPickler.dumps(([], [("r-0", output)], None))
            frame = struct.pack("!i", len(message)) + message  # Connection's framing: its length, then the bytes
            with socket.socket(fileno=os.dup(engine_end.fileno())) as raw:
                raw.sendall(frame[:1000])
                time.sleep(0.3)  # the front end sees a message begin, and must wait for the rest
                raw.sendall(frame[1000:])

        async def run():
            client.start()
            outputs = client.run(["r-0"], [prompt], SamplingParams(max_tokens=1))
            assert await anext(outputs) is None  # queued
            return [item async for item in outputs]

        async def stop():  # (on the loop, as the app's lifespan calls it)
            client.stop()

        side = threading.Thread(target=engine_side)
        side.start()
        loop = NonBlockingWatches()
        try:
            received = loop.run_until_complete(asyncio.wait_for(run(), 30))
            assert client.error is None and received == [(0, output)]
        finally:
            side.join(30)
            loop.run_until_complete(stop())
            loop.close()
            engine_end.close()
        assert not side.is_alive() and not client.sender.is_alive() and not client.receiver.is_alive()

    def test_a_front_end_that_dies_aborts_its_requests(self, chat_checkpoint):
        """The front end's process killed mid-stream: the engine loop aborts what it was running (no block kept)
        and ends."""
        import signal
        import socket
        llm = LLM(chat_checkpoint[0], **_SERVER_ARGS)
        free = len(llm.scheduler.kv_cache_manager.free_queue)
        running, port = _serve(llm, "tiny")
        body = json.dumps(dict(prompt="the cat", max_tokens=900, ignore_eos=True, stream=True)).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            received = b""
            while b"data: {" not in received:  # it is running
                received += sock.recv(4096)
            os.kill(running.frontend.pid, signal.SIGKILL)
            running.engine.thread.join(60)
        assert not running.engine.thread.is_alive() and not llm.has_unfinished_requests()
        assert len(llm.scheduler.kv_cache_manager.free_queue) == free
        _stop(running)

    def test_bench_through_the_server_gives_the_in_process_tokens_and_latency_fields(self, tmp_path, monkeypatch):
        """bench.py --through-server streams the same requests over HTTP from another process: the same output
        tokens (each request's max_tokens: ignore_eos) and latency rows as the in-process run; nothing left running."""
        import multiprocessing
        argv = ["bench.py", "--arch", "tiny", "--workload", "mixed", "--num-seqs", "8", "--max-input-len", "100",
                "--max-output-len", "6", "--request-rate", "200", "--json", str(tmp_path / "out.json")]
        _, params = bench.make_workload("mixed", 8, 100, 6, vocab_limit=511)
        threads, results = set(threading.enumerate()), []
        processes = set(multiprocessing.active_children())
        for extra in ([], ["--through-server"]):
            monkeypatch.setattr(sys, "argv", argv + extra)
            bench.main()
            results.append(json.loads((tmp_path / "out.json").read_text()))
        in_process, served = results
        assert (in_process["through_server"], served["through_server"]) == (False, True)
        assert served["output_tokens"] == in_process["output_tokens"] == sum(p.max_tokens for p in params)
        assert set(served["latency"]) == set(in_process["latency"])
        for name, row in served["latency"].items():
            assert row["requests"] == in_process["latency"][name]["requests"]
            assert all(len(row[key]) == 3 and None not in row[key] for key in ("ttft_ms_p50_p90_p99",
                                                                               "itl_ms_p50_p90_p99"))
        assert set(threading.enumerate()) == threads and set(multiprocessing.active_children()) == processes

    def test_command_line_serves_and_stops_on_sigterm(self, chat_checkpoint):
        import signal
        import socket
        import subprocess
        import openai
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        process = subprocess.Popen(
            [sys.executable, "server.py", "--model", chat_checkpoint[0], "--port", str(port), "--dtype", "float32",
             "--max-num-seqs", "4", "--no-enable-prefix-caching", "--enforce-eager", "--served-model-name", "cli"],
            cwd=os.path.dirname(os.path.abspath(__file__)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    if _http(port, "GET", "/health")[0] == 200:
                        break
                except OSError:
                    time.sleep(0.2)
            with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0) as client:
                assert [m.id for m in client.models.list().data] == ["cli"]
                reply = client.chat.completions.create(model="cli", messages=[{"role": "user", "content": "hi"}],
                                                       max_tokens=3, temperature=0)
                assert reply.usage.completion_tokens >= 1
            process.send_signal(signal.SIGTERM)
            # uvicorn stops, then the engine thread (the app's shutdown), then it re-raises the signal: the process ends
            assert process.wait(timeout=60) in (0, -signal.SIGTERM)
            assert "Application shutdown complete" in process.stdout.read()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
