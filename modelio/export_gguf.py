"""Export a saved model folder to GGUF, the file llama.cpp (and Ollama, LM Studio, llama-cpp-python) runs.

``python -m modelio.export_gguf MODEL_DIR --outfile FILE.gguf --outtype f16``

A model whose layers all have the same sizes is written as a plain ``llama`` file. One whose layers differ
(per-layer query heads, key-value heads or MLP widths, as every adaptive method leaves them) is written as
``deci``, the architecture llama.cpp reads Nemotron-NAS with: its header holds one head count, key-value head
count and feed-forward length per layer. Removed layers are simply absent.

What llama.cpp's llama / deci graph cannot compute is refused from ``config.json`` alone, in seconds, before the
weights are read: factorized projections (LoRAP, SVD-LLM, the default), value heads narrower than the keys
(FLAT-LLM), families whose layer is not LLaMA's. A factorized model may be exported with its factors multiplied
back (``--dense_factors``): the command says how many parameters that adds.

MLP widths are padded with zero channels to a multiple of ``--pad_mlp_to`` (32), which changes no output: llama.cpp's
fast kernels and q8_0's blocks want that, and a layer whose MLP lost every channel (the ``deci`` graph would drop
that layer's attention output) gets zero channels the same way.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
from torch import nn

from modelio.load import ModelNotFoundError
from modelio.outputs import Output, UnsafeSaveError, check_outputs, replace_file

# Families whose decoder layer is LLaMA's (pre-norm RMSNorm, rotary attention, SiLU-gated MLP, optional
# projection biases), so llama.cpp's llama / deci graph computes exactly what transformers does.
FAMILIES = ("llama", "mistral", "qwen2")
OUTTYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
ROPE_TYPES = ("default", "llama3", "linear")
PAD_MLP_TO = 32  # llama.cpp's fast f16/bf16 matrix kernels and q8_0's blocks want the reduced dimension a multiple of 32
EXPORTING_METHODS = "flap, flap_refit, llm_pruner, wanda_sp, layer_wise and the other pure removals"


class ExportRefused(ValueError):
    """The model cannot be written as a GGUF file llama.cpp computes correctly; the message says why."""


@dataclass
class LayerSizes:
    """One decoder layer as llama.cpp's header describes it."""

    heads: int
    kv_heads: int
    feed_forward: int


@dataclass
class ExportSummary:
    path: Path
    architecture: str
    layers: list[LayerSizes]
    parameters: int
    added_parameters: int = 0  # by --dense_factors
    padded_parameters: int = 0  # zero MLP channels (pad_mlp_to)
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        size = self.path.stat().st_size / 2**20
        text = (f"wrote {self.path} ({self.architecture}, {len(self.layers)} layers, {self.parameters:,} parameters, "
                f"{size:.1f} MiB)")
        return text + "".join(f"; {note}" for note in self.notes)


# ---------------------------------------------------------------------------------------------------- checks


def _config_of(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ExportRefused(f"{folder} has no config.json: export a model folder saved by hf_prune.py "
                            f"(--save_model) or post_training.py (--output_dir)")
    return json.loads(path.read_text())


def check_exportable(config: dict, dense_factors: bool = False) -> list[str]:
    """Refuse (ExportRefused, one line) what llama.cpp cannot load from the config alone; return notes."""
    family = str(config.get("model_type", "")).removeprefix("pruned_")
    if family not in FAMILIES:
        raise ExportRefused(f"a {family or 'model of unknown type'} model does not map onto llama.cpp's llama/deci "
                            f"graph: GGUF export covers {', '.join(FAMILIES)}")
    if config.get("hidden_act", "silu") != "silu":
        raise ExportRefused(f"hidden_act {config.get('hidden_act')} is not llama.cpp's SiLU-gated MLP: cannot export")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ExportRefused(f"rope type {rope_type} is not exported (supported: {', '.join(ROPE_TYPES)})")
    if float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise ExportRefused("a partial rotary embedding does not map onto llama.cpp's llama graph: cannot export")
    attributes = config.get("pruned_module_attributes") or {}
    if any("value_head_dim" in values for values in attributes.values()):
        raise ExportRefused("its value heads are narrower than its key heads (FLAT-LLM's rotation), which llama.cpp "
                            f"cannot compute: methods whose results export are {EXPORTING_METHODS}")
    if config.get("pruned_lowrank") and not dense_factors:
        count = len(config["pruned_lowrank"])
        raise ExportRefused(f"{count} projections are factorized (LoRAP, SVD-LLM, the default), which llama.cpp's "
                            f"graph cannot load: pass --dense_factors to multiply them back (more parameters), or "
                            f"prune with one of {EXPORTING_METHODS}")
    notes = []
    window = config.get("sliding_window")
    if window and (family != "qwen2" or config.get("use_sliding_window")) \
            and window < int(config.get("max_position_embeddings") or 0):
        notes.append(f"llama.cpp's llama graph attends to the whole context: the {window}-token sliding window "
                     f"applies only beyond {window} tokens, as with llama.cpp's own converter")
    return notes


def _tokenizer_file(folder: Path) -> dict:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportRefused(f"{folder} has no tokenizer.json: llama.cpp needs the tokenizer; save the model with "
                            f"its (fast) tokenizer")
    tokenizer = json.loads(path.read_text())
    model_type = tokenizer.get("model", {}).get("type")
    if model_type != "BPE":
        raise ExportRefused(f"a {model_type} tokenizer is not exported (byte-level or byte-fallback BPE only)")
    if not tokenizer["model"].get("byte_fallback") and not tokenizer["model"].get("merges"):
        # llama.cpp refuses a BPE vocabulary without merges, and GGUF has no empty arrays
        raise ExportRefused("the tokenizer has no BPE merges, which llama.cpp's BPE vocabulary requires: "
                            "cannot export")
    return tokenizer


# ---------------------------------------------------------------------------------------------------- tokenizer

# llama.cpp names the regular expression a byte-level BPE splits text with before merging ("pre-tokenizer").
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
SPLIT_NAMES = {
    GPT2_SPLIT: "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


def _flatten(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    return [step for item in pre.get("pretokenizers", [pre]) for step in ([item] if item.get("type") != "Sequence"
                                                                           else _flatten(item))]


def pre_tokenizer_name(tokenizer: dict) -> str | None:
    """llama.cpp's name for the tokenizer.json's pre-tokenizer, or None when it is not one of those known."""
    steps = _flatten(tokenizer.get("pre_tokenizer"))
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return SPLIT_NAMES.get(steps[0].get("pattern", {}).get("Regex"))
    return None


def _embedded_pre(tokens: list[str]) -> str | None:
    """The pre-tokenizer name the embedded model's own GGUF carries, when ``tokens`` are its vocabulary (its
    transformers conversion keeps the merges but not the digit splitting)."""
    from modelio.load import EMBEDDED_MODELS, _gguf_location

    for spec in EMBEDDED_MODELS.values():
        try:
            reader = gguf.GGUFReader(str(_gguf_location(spec) / spec.gguf_file))
        except (ModelNotFoundError, OSError):
            continue
        listed = reader.fields.get("tokenizer.ggml.tokens")
        pre = reader.fields.get("tokenizer.ggml.pre")
        if listed is not None and pre is not None and len(listed.data) == len(tokens) \
                and listed.contents(0) == tokens[0] and listed.contents() == tokens:
            return pre.contents()
    return None


def _token_table(tokenizer: dict, vocab_size: int) -> tuple[list[str], list[int], list[float]]:
    """Tokens by id, their llama.cpp types and scores; ids the tokenizer does not use are unused padding."""
    vocab = dict(tokenizer["model"]["vocab"])
    added = {entry["id"]: entry for entry in tokenizer.get("added_tokens", [])}
    for index, entry in added.items():
        vocab[entry["content"]] = index
    if vocab and max(vocab.values()) >= vocab_size:
        raise ExportRefused(f"the tokenizer has ids up to {max(vocab.values())} but the embedding only "
                            f"{vocab_size} rows: cannot export")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    scores = [0.0] * vocab_size
    unknown = tokenizer["model"].get("unk_token")
    for text, index in vocab.items():
        tokens[index] = text
        if index in added:
            types[index] = gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED
        elif text == unknown:
            types[index] = gguf.TokenType.UNKNOWN
        elif tokenizer["model"].get("byte_fallback") and len(text) == 6 and text.startswith("<0x"):
            types[index] = gguf.TokenType.BYTE
        else:
            types[index] = gguf.TokenType.NORMAL
            scores[index] = -float(index)  # SentencePiece-style merge priority: earlier ids merge first
    return tokens, types, scores


def write_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> list[str]:
    """The vocabulary, merges, special tokens and chat template of ``folder``'s tokenizer; returns notes."""
    tokenizer = _tokenizer_file(folder)
    tokens, types, scores = _token_table(tokenizer, vocab_size)
    notes = []
    byte_fallback = bool(tokenizer["model"].get("byte_fallback"))
    if byte_fallback:  # SentencePiece converted to BPE (LLaMA 1/2, Mistral 7B): llama.cpp's "llama" vocabulary
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
    else:
        pre = _embedded_pre(tokens) or pre_tokenizer_name(tokenizer)
        if pre is None:
            pre = "default"
            notes.append("its pre-tokenizer is not one llama.cpp names: written as 'default' (check tokenization)")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    if not byte_fallback:  # _tokenizer_file refused a byte-level vocabulary without merges
        writer.add_token_merges([" ".join(pair) if isinstance(pair, list) else pair
                                 for pair in tokenizer["model"]["merges"]])
    special.add_to_gguf(writer, quiet=True)
    return notes


# ---------------------------------------------------------------------------------------------------- weights


def layer_sizes(model: nn.Module) -> list[LayerSizes]:
    """Each decoder layer's query heads, key-value heads and MLP width, read off its weights."""
    from depgraph import rule_for

    rule = rule_for(model)
    sizes = []
    for layer in rule.decoder_layers(model):
        heads, kv_heads = rule.head_counts(layer.get_submodule(rule.attention))
        sizes.append(LayerSizes(int(heads), int(kv_heads), rule.mlp_width(layer)))
    return sizes


def rotary_pairs_adjacent(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from transformers' rotate-half layout (pairs i, i + d/2) to llama.cpp's
    (pairs 2i, 2i + 1), for the query or key projection's weight or bias."""
    if heads == 0:
        return weight
    rest = weight.shape[1:]
    head_dim = weight.shape[0] // heads
    return weight.reshape(heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(weight.shape)


def multiply_factors(model: nn.Module) -> int:
    """Replace every LowRankLinear by the plain linear its factors make; the parameters this adds."""
    from modelio.lowrank import LowRankLinear

    added = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, LowRankLinear):
            continue
        dense = nn.Linear(module.in_features, module.out_features, bias=module.up.bias is not None,
                          dtype=module.up.weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(module.dense_weight())
            if module.up.bias is not None:
                dense.bias.copy_(module.up.bias)
        added += dense.weight.numel() - module.up.weight.numel() - module.down.weight.numel()
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attribute, dense)
    return added


def _rms_epsilon(model: nn.Module) -> float:
    epsilons = {float(module.variance_epsilon) for module in model.modules() if hasattr(module, "variance_epsilon")}
    if len(epsilons) != 1:
        raise ExportRefused(f"its norms use {len(epsilons)} different epsilons ({sorted(epsilons)}), llama.cpp one: "
                            "cannot export")
    return epsilons.pop()


def _rope_metadata(writer: gguf.GGUFWriter, config, head_dim: int) -> dict[str, torch.Tensor]:
    """Rope keys in the header; for Llama-3-style scaling the per-frequency divisors llama.cpp applies."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(head_dim)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if kind != "llama3":
        return {}
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return {"rope_freqs.weight": (plain / scaled.float()).float()}


def _padded_mlp(layer: dict[str, torch.Tensor], sizes: LayerSizes, hidden: int, multiple: int) -> LayerSizes:
    """The MLP widened with zero channels to a multiple of ``multiple`` (exact: a zero gate and up row gives a zero
    activation, a zero down column adds nothing). llama.cpp's fast matrix kernels, and q8_0's 32-value blocks,
    want the reduced dimension (the down projection's rows) a multiple of 32; a width of 1,229 left by pruning
    takes its slow path. An MLP with no channels left gets the same (the deci graph would otherwise drop that
    layer's attention output)."""
    width = sizes.feed_forward
    target = -(-max(width, 1) // multiple) * multiple
    if target == width:
        return sizes
    pad = target - width
    for name in ("ffn_gate", "ffn_up"):
        weight = layer.get(f"{name}.weight", torch.zeros(0, hidden))
        layer[f"{name}.weight"] = torch.cat([weight, torch.zeros(pad, hidden)])
        if f"{name}.bias" in layer:
            layer[f"{name}.bias"] = torch.cat([layer[f"{name}.bias"], torch.zeros(pad)])
    down = layer.get("ffn_down.weight", torch.zeros(hidden, 0))
    layer["ffn_down.weight"] = torch.cat([down, torch.zeros(hidden, pad)], dim=1)
    layer.setdefault("ffn_norm.weight", torch.ones(hidden))
    return LayerSizes(sizes.heads, sizes.kv_heads, target)


def gguf_tensors(model: nn.Module, sizes: list[LayerSizes], pad_mlp_to: int = 1
                 ) -> tuple[dict[str, torch.Tensor], list[LayerSizes]]:
    """Every tensor under its GGUF name (query / key rows in llama.cpp's rotary order), and each layer's sizes as
    written (MLP widths padded with zero channels to a multiple of ``pad_mlp_to``)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, len(sizes))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors: dict[str, torch.Tensor] = {}
    per_layer: list[dict[str, torch.Tensor]] = [{} for _ in sizes]
    for name, tensor in model.state_dict().items():
        if tied and name.endswith("lm_head.weight"):
            continue
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ExportRefused(f"{name} has no place in llama.cpp's llama graph: cannot export")
        tensor = tensor.detach().float().cpu()
        if not mapped.startswith("blk."):
            tensors[mapped] = tensor
            continue
        _, index, local = mapped.split(".", 2)
        layer = sizes[int(index)]
        if local.startswith("attn_q."):
            tensor = rotary_pairs_adjacent(tensor, layer.heads)
        elif local.startswith("attn_k."):
            tensor = rotary_pairs_adjacent(tensor, layer.kv_heads)
        if tensor.numel():  # an emptied MLP's projections are not written
            per_layer[int(index)][local] = tensor
    hidden = int(model.get_input_embeddings().weight.shape[1])
    written = []
    for index, (layer, layer_size) in enumerate(zip(per_layer, sizes)):
        if layer_size.heads == 0:  # the engine keeps at least one head in every layer it keeps
            raise ExportRefused(f"layer {index} has no attention heads, which llama.cpp's deci graph mishandles: "
                                f"remove the layer instead")
        written.append(_padded_mlp(layer, layer_size, hidden, pad_mlp_to))
        tensors.update({f"blk.{index}.{local}": tensor for local, tensor in layer.items()})
    return tensors, written


def _encoded(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray,
                                                                               gguf.GGMLQuantizationType]:
    """The tensor in the file's type: norms, biases and rope divisors stay float32, as llama.cpp expects; a
    matrix whose rows do not fill whole q8_0 blocks is written f16."""
    array = tensor.contiguous().numpy().astype(np.float32)
    if array.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
        return array, gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16), qtype
    if qtype == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(array, qtype), qtype


# ---------------------------------------------------------------------------------------------------- export


def _header(writer: gguf.GGUFWriter, config, sizes: list[LayerSizes], head_dim: int, hidden: int,
            uniform: bool) -> None:
    def per_layer(values: list[int]) -> int | list[int]:
        return values[0] if uniform else values

    writer.add_name(str(getattr(config, "_name_or_path", "") or "structprune model").rstrip("/").split("/")[-1])
    writer.add_block_count(len(sizes))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(per_layer([s.feed_forward for s in sizes]))
    writer.add_head_count(per_layer([s.heads for s in sizes]))
    writer.add_head_count_kv(per_layer([s.kv_heads for s in sizes]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config.vocab_size))


def export_gguf(model_dir: str | Path, outfile: str | Path, outtype: str = "f16", dense_factors: bool = False,
                overwrite: bool = False, log: Callable[[str], None] = print, pad_mlp_to: int = PAD_MLP_TO
                ) -> ExportSummary:
    """Write ``model_dir`` (a saved folder) as the GGUF file ``outfile``, atomically (never half written).

    Refusals (``ExportRefused``) come from the config before any weight is read."""
    from modelio.load import load_model

    folder = Path(model_dir)
    target = check_target(outfile, outtype, [folder], overwrite, log, pad_mlp_to)
    notes = check_exportable(_config_of(folder), dense_factors)
    _tokenizer_file(folder)
    model = load_model(folder, dtype=torch.float32)
    return write_gguf(model, folder, target, outtype, dense_factors, notes, pad_mlp_to)


def check_target(outfile: str | Path, outtype: str, inputs, overwrite: bool,
                 log: Callable[[str], None] = print, pad_mlp_to: int = PAD_MLP_TO) -> Path:
    """The file to write, or UnsafeSaveError / ExportRefused naming the fix; writes nothing."""
    if outtype not in OUTTYPES:
        raise ExportRefused(f"--outtype {outtype} is not one of {', '.join(OUTTYPES)}")
    if pad_mlp_to < 1:
        raise ExportRefused(f"--pad_mlp_to {pad_mlp_to}: pad to a multiple of 1 or more (1: no padding)")
    return check_outputs([Output.file("--outfile", outfile, formats=("gguf",))], inputs, overwrite, log=log)[0]


def write_gguf(model: nn.Module, tokenizer_folder: str | Path, target: str | Path, outtype: str = "f16",
               dense_factors: bool = False, notes: list[str] | None = None, pad_mlp_to: int = PAD_MLP_TO
               ) -> ExportSummary:
    """Write a loaded model (``check_exportable`` passed) with the tokenizer saved in ``tokenizer_folder``.
    ``dense_factors`` multiplies factorized projections back in place, in ``model`` itself."""
    from depgraph import rule_for

    notes = list(notes or [])
    added = multiply_factors(model) if dense_factors else 0
    if added:
        notes.append(f"factors multiplied back: +{added:,} parameters")
    config = model.config
    rule = rule_for(model)
    head_dim = int(rule.head_dim(rule.decoder_layers(model)[0].get_submodule(rule.attention)))
    epsilon = _rms_epsilon(model)
    pruned = layer_sizes(model)
    tensors, sizes = gguf_tensors(model, pruned, pad_mlp_to)
    hidden = int(model.get_input_embeddings().weight.shape[1])
    padded = sum(written.feed_forward - own.feed_forward for written, own in zip(sizes, pruned))
    padded_parameters = sum(t.numel() for t in tensors.values()) - sum(p.numel() for p in model.parameters())
    if padded:
        notes.append(f"MLP widths padded with {padded:,} zero channels to multiples of {pad_mlp_to} "
                     f"(+{padded_parameters:,} zero parameters; exact, and llama.cpp's fast kernels apply)")
    uniform = all(s == sizes[0] for s in sizes)  # every layer has heads and, padded, an MLP
    architecture = "llama" if uniform else "deci"
    file_type, qtype = OUTTYPES[outtype]
    with replace_file(target) as temporary:
        writer = gguf.GGUFWriter(temporary, architecture)
        _header(writer, config, sizes, head_dim, hidden, uniform)
        writer.add_layer_norm_rms_eps(epsilon)
        tensors.update(_rope_metadata(writer, config, head_dim))
        writer.add_file_type(file_type)
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        notes += write_tokenizer(writer, Path(tokenizer_folder), int(config.vocab_size))
        for name, tensor in tensors.items():
            array, kind = _encoded(tensor, qtype)
            writer.add_tensor(name, array, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    parameters = sum(t.numel() for t in tensors.values())
    return ExportSummary(Path(target), architecture, sizes, parameters, added, padded_parameters, notes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m modelio.export_gguf", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a saved model folder (hf_prune.py --save_model, post_training.py "
                                          "--output_dir)")
    parser.add_argument("--outfile", required=True, help="the .gguf file to write (replaced atomically)")
    parser.add_argument("--outtype", choices=list(OUTTYPES), default="f16", help="weights' type in the file")
    parser.add_argument("--dense_factors", action="store_true",
                        help="multiply factorized projections back into plain ones (more parameters) instead of "
                             "refusing them")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --outfile")
    parser.add_argument("--pad_mlp_to", type=int, default=PAD_MLP_TO,
                        help="pad each MLP's width with zero channels to a multiple of this (exact; 1: no padding), "
                             "so that llama.cpp's fast kernels and q8_0 blocks apply")
    return parser


def cli(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = export_gguf(args.model_dir, args.outfile, args.outtype, args.dense_factors, args.overwrite,
                              pad_mlp_to=args.pad_mlp_to)
    except (ExportRefused, UnsafeSaveError, ModelNotFoundError) as error:  # a corrupt or truncated folder too
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(cli())
