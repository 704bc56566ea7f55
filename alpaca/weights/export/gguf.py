"""The GGUF export: one file for llama.cpp written with the `gguf` package (llama.cpp's own), laid out as
llama.cpp's `convert_hf_to_gguf.py` lays out a LLaMA, sentencepiece or BPE vocabulary; it is read back and
compared tensor by tensor. (`import gguf` below is the top-level package: imports are absolute.)"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from alpaca.modeling import load_plain_tokenizer
from alpaca.weights.export.core import (
    MergedModel,
    copy_tokenizer_model,
    rope_settings,
    unpermute_rotary,
)
from alpaca.weights.export.quantize import (
    file_type,
    quantize_array,
    tensor_type,
)

# llama.cpp names a byte-level BPE pre-tokenizer (the regex splitting text before BPE) by the SHA-256 of
# the token ids its tokenizer gives for this probe text (convert_hf_to_gguf.py's `get_vocab_base_pre`);
# the runtime then applies its own implementation of that pre-tokenizer. The hashes of the LLaMA-family
# BPE tokenizers, as llama.cpp's converter records them:
BPE_PRE_PROBE = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
BPE_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
# llama.cpp's LLaMA converter writes add_bos_token=False for every 49152-token vocabulary (Granite's
# and SmolLM's sizes; neither tokenizer adds a BOS).
NO_BOS_VOCAB_SIZE = 49152


def bpe_pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer, or a ValueError (as llama.cpp refuses too)."""
    digest = hashlib.sha256(str(tokenizer.encode(BPE_PRE_PROBE)).encode()).hexdigest()
    if digest not in BPE_PRE_TOKENIZERS:
        raise ValueError(
            f"the BPE tokenizer's pre-tokenizer is not one this export knows (probe hash {digest}); "
            "llama.cpp names pre-tokenizers by this hash in convert_hf_to_gguf.py's get_vocab_base_pre: "
            "convert the HF export (export_hf_checkpoint.py) with a llama.cpp that knows it"
        )
    return BPE_PRE_TOKENIZERS[digest]


def does_token_look_special(token: str) -> bool:
    """llama.cpp's rule for added tokens that should be control tokens although not marked special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def gguf_bpe_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types of a byte-level BPE vocabulary as llama.cpp's `get_vocab_base` builds them:
    ids without a token are `[PAD{id}]` (unused); added tokens are control (special or special-looking)
    or user-defined, stored in their normalized form."""
    import gguf

    types = gguf.TokenType
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(
            f"the tokenizer has ids up to {max(vocab.values())}, beyond the {vocab_size} embeddings"
        )
    reverse = {token_id: token for token, token_id in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, toktypes = [], []
    for token_id in range(vocab_size):
        if token_id not in reverse:
            tokens.append(f"[PAD{token_id}]")
            toktypes.append(int(types.UNUSED))
            continue
        token = reverse[token_id]
        if token in added:
            if not decoder[token_id].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[token_id].special or does_token_look_special(token):
                toktypes.append(int(types.CONTROL))
            else:
                token = token.replace("\u2581", " ")  # llama.cpp pre-normalizes user-defined spaces
                toktypes.append(int(types.USER_DEFINED))
        else:
            toktypes.append(int(types.NORMAL))
        tokens.append(token)
    return tokens, toktypes


def gguf_spm_vocab(tokenizer, sp_model_path: Path, vocab_size: int):
    """Tokens, scores and token types as llama.cpp's converter builds them from a sentencepiece model,
    plus the tokenizer's added tokens beyond it (e.g. `[PAD]`: control, score -1000)."""
    import gguf
    from sentencepiece import SentencePieceProcessor

    types = gguf.TokenType
    sp = SentencePieceProcessor(model_file=str(sp_model_path))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    toktypes = [int(types.UNUSED)] * vocab_size
    for token_id in range(min(sp.vocab_size(), vocab_size)):
        toktype = types.NORMAL
        if sp.IsUnknown(token_id):
            toktype = types.UNKNOWN
        elif sp.IsControl(token_id):
            toktype = types.CONTROL
        elif sp.IsUnused(token_id):
            toktype = types.UNUSED
        elif sp.IsByte(token_id):
            toktype = types.BYTE
        tokens[token_id] = sp.IdToPiece(token_id).encode("utf-8")
        scores[token_id] = sp.GetScore(token_id)
        toktypes[token_id] = int(toktype)
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if sp.vocab_size() <= token_id < vocab_size:
            tokens[token_id] = added.content.encode("utf-8")
            scores[token_id] = -1000.0
            toktypes[token_id] = int(types.CONTROL if added.special else types.USER_DEFINED)
    return tokens, scores, toktypes


def gguf_tensors(model, outtype: str, state: dict | None = None) -> dict:
    """GGUF name -> (numpy array, GGML type), in llama.cpp's layout: q/k in Meta's rotary order, each
    tensor in the type llama.cpp gives it for `outtype` (norms and other 1-D tensors in f32; see
    `alpaca.weights.export.quantize`). `state` (parameter name -> tensor) converts those tensors instead of all
    of the model's."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if state is None:
        state = dict(model.state_dict())
        # With tied embeddings the HF files hold no lm_head, and llama.cpp then reuses token_embd: do the same.
        state.pop("lm_head.weight", None)
        if not tied:
            state["lm_head.weight"] = model.get_output_embeddings().weight
    tensors = {}
    for name in sorted(state):
        tensor = state[name].detach().float()
        if name.endswith("q_proj.weight"):
            tensor = unpermute_rotary(tensor, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            tensor = unpermute_rotary(tensor, config.num_key_value_heads)
        new_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ValueError(f"tensor {name!r} has no GGUF name for the llama architecture")
        data = tensor.contiguous().numpy()
        qtype = tensor_type(new_name, data.shape, outtype, tied)
        tensors[new_name] = (quantize_array(data, qtype), qtype)
    return tensors


def write_gguf_hparams(writer, config, outtype: str) -> None:
    """Hyperparameters under llama.cpp's `llama.*` keys, as its HF converter sets them."""

    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_settings(config)["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(file_type(outtype))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)


def write_gguf_tokenizer(writer, hf_dir: Path, vocab_size: int, vocab_type: str) -> None:
    """Vocabulary (tokens, scores or merges, token types), pre-tokenizer, special ids, add-bos/eos flags
    and the chat template, as llama.cpp's LLaMA converter writes them for this kind of tokenizer."""
    import gguf

    # Read the tokenizer back from the folder, as llama.cpp's converter reads the HF export.
    tokenizer = load_plain_tokenizer(str(hf_dir))
    tokenizer_config = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    if (add_prefix_space := tokenizer_config.get("add_prefix_space")) is not None:
        writer.add_add_space_prefix(add_prefix_space)
    if vocab_type == "bpe":
        tokens, toktypes = gguf_bpe_vocab(tokenizer, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(bpe_pre_tokenizer(tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types(toktypes)
        gguf.SpecialVocab(hf_dir, load_merges=True).add_to_gguf(writer)
    else:
        if vocab_type == "spm":
            tokens, scores, toktypes = gguf_spm_vocab(tokenizer, hf_dir / "tokenizer.model", vocab_size)
        else:  # LLaMA-style BPE in a tokenizer.json: the gguf package reads it as llama.cpp does
            tokens, scores, toktypes = (
                list(column) for column in zip(*gguf.LlamaHfVocab(hf_dir).all_tokens())
            )
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(toktypes)
        gguf.SpecialVocab(hf_dir, n_vocab=len(tokens)).add_to_gguf(writer)
    if vocab_size == NO_BOS_VOCAB_SIZE:
        writer.add_add_bos_token(False)


def write_gguf(
    merged: MergedModel, path: Path, outtype: str, model_name: str | None, name_hint: str, vocab_type: str
) -> dict:
    """Write the GGUF file and return the tensors written (for the read-back check)."""
    import gguf

    model = merged.model
    tensors = gguf_tensors(model, outtype)
    with tempfile.TemporaryDirectory() as tmp:
        # The gguf package reads special ids and model-card metadata from an HF-style folder; give it
        # one named like the model so its naming heuristics see what llama.cpp's converter would.
        hf_dir = Path(tmp) / name_hint
        hf_dir.mkdir()
        merged.tokenizer.save_pretrained(hf_dir)
        copy_tokenizer_model(merged, hf_dir)
        model.config.save_pretrained(hf_dir)
        model.generation_config.save_pretrained(hf_dir)
        writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        for name, (data, qtype) in tensors.items():
            writer.add_tensor(name, data, raw_dtype=qtype)
        total, shared, expert, expert_count = writer.get_total_parameter_count()
        metadata = gguf.Metadata.load(None, hf_dir, model_name, total)
        if metadata.name is None:
            metadata.name = name_hint
        if metadata.size_label is None and total > 0:
            metadata.size_label = gguf.size_label(total, shared, expert, expert_count)
        writer.add_type(gguf.GGUFType.MODEL)
        metadata.set_gguf_meta_model(writer)
        write_gguf_hparams(writer, model.config, outtype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_gguf_tokenizer(writer, hf_dir, model.config.vocab_size, vocab_type)
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return tensors


def check_gguf_readback(path: Path, tensors: dict, config, check_tensors: bool = True) -> None:
    """Read the file back with the gguf reader; every tensor and the main hyperparameters must match."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    found = {t.name: t for t in reader.tensors}
    if check_tensors and set(found) != set(tensors):
        raise ValueError(
            f"self-check failed: {path} holds tensors {sorted(set(found) ^ set(tensors))} unexpectedly"
        )
    for name, (data, qtype) in tensors.items():
        got = found[name]
        if got.tensor_type != qtype or not np.array_equal(np.asarray(got.data).reshape(data.shape), data):
            raise ValueError(f"self-check failed: tensor {name} in {path} differs from the merged weight")
    expected = {
        "general.architecture": "llama",
        "llama.block_count": config.num_hidden_layers,
        "llama.embedding_length": config.hidden_size,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
        "llama.vocab_size": config.vocab_size,
    }
    for key, value in expected.items():
        field_ = reader.get_field(key)
        if field_ is None or field_.contents() != value:
            raise ValueError(
                f"self-check failed: {path} has {key}={field_ and field_.contents()!r}, expected {value!r}"
            )
