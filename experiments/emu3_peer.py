"""nano_emu's models inside transformers' Emu3ForConditionalGeneration: the peer bench.py measures against.

- tiny_emu3: a random Emu3 built by transformers and nano_emu's GPT holding the same decoder weights
  (bench.py transformers: greedy tokens must be identical);
- emu3_from_tiny: a trained train_tiny.py checkpoint converted into Emu3 through the literal transformers key
  layout, as a user would (bench.py sjd --transformers: images/s of transformers' generate on the same model);
- transformers_draw: codes drawn by transformers' generate with a Pipeline's prompts and sampling (CFG through
  negative_prompt_ids, Emu3's prefix_allowed_tokens_fn as the grid constraint).
"""
import itertools

import torch

from nano_emu.gpt import GPT, GPTConfig
from nano_emu.layout import Layout


def emu3_model(layout: Layout, config: GPTConfig):
    """An (untrained) transformers Emu3ForConditionalGeneration over nano_emu's layout with a GPT config's decoder
    shapes: the special tokens under Emu3's names at the layout's ids, the visual tokens, and one id more for the
    "<image>" placeholder transformers' processor needs (never generated: the grid constraint forbids it)."""
    import transformers

    specials = dict(zip(("pad", "bos", "eos", "img", "boi", "eoi", "eol", "eof"),
                        ("<|endoftext|>", "<|extra_203|>", "<|extra_204|>", "<|image token|>", "<|image start|>",
                         "<|image end|>", "<|extra_200|>", "<|extra_201|>")))
    vocabulary = {name: getattr(layout, field) for field, name in specials.items()}
    taken = set(vocabulary.values())
    vocabulary |= {f"<|text {i}|>": i for i in range(layout.first_visual) if i not in taken}   # the caption ids
    vocabulary |= {f"<|visual token {c:06d}|>": layout.first_visual + c for c in range(layout.codebook_size)}
    vocabulary["<image>"] = layout.vocab_size
    text = dict(vocab_size=layout.vocab_size + 1, hidden_size=config.dim, intermediate_size=config.intermediate_size,
                num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                num_key_value_heads=config.n_kv_head, max_position_embeddings=config.max_seq_len,
                rms_norm_eps=config.norm_eps, pad_token_id=layout.pad, bos_token_id=layout.bos,
                eos_token_id=layout.eos, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta})
    vq = dict(base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[1], hidden_size=64,
              codebook_size=layout.codebook_size, embed_dim=4, latent_channels=4)   # unused: codes decode in nano_emu
    return transformers.Emu3ForConditionalGeneration(
        transformers.Emu3Config(text_config=text, vq_config=vq, vocabulary_map=vocabulary)).eval()


def tiny_emu3(codebook: int, dim: int = 64, n_layer: int = 2):
    """A random transformers Emu3ForConditionalGeneration on nano_emu's tiny layout, and nano_emu's GPT holding the
    same decoder weights. Default sizes as tests/test_emu3.py (dim 64, 2 layers, GQA 4/2, SwiGLU width 1.5 dim)."""
    from nano_emu.emu3 import KEY_LAYOUTS
    from nano_emu.weights import load_state_dict_strict

    layout = Layout.tiny(codebook_size=codebook)
    config = GPTConfig(vocab_size=layout.vocab_size + 1, n_layer=n_layer, n_head=4, n_kv_head=2, dim=dim,
                       intermediate_size=3 * dim // 2, norm_eps=1e-5, rope_theta=5e5, max_seq_len=4096)
    torch.manual_seed(0)
    ref = emu3_model(layout, config)
    with torch.no_grad():   # larger random weights: peaked logits, so greedy ties are out of the question
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    names = KEY_LAYOUTS["transformers"]
    state = {k.removeprefix(names["decoder"]): v for k, v in ref.state_dict().items() if k.startswith(names["decoder"])}
    state["lm_head.weight"] = ref.state_dict()[names["head"]]
    gpt = GPT(config).eval()
    load_state_dict_strict(gpt, state, source="transformers Emu3ForConditionalGeneration")
    return ref, gpt, layout


def emu3_from_tiny(pipe):
    """A trained tiny checkpoint's GPT inside transformers' Emu3ForConditionalGeneration, through the literal
    transformers key layout (model.text_model.* + lm_head.weight), as a user converting it would: strict, and the
    placeholder row of the embedding and head left at zero."""
    from nano_emu.emu3 import KEY_LAYOUTS

    names = KEY_LAYOUTS["transformers"]
    ref = emu3_model(pipe.layout, pipe.gpt.config)
    state = {names["decoder"] + k: v for k, v in pipe.gpt.state_dict().items() if k != "lm_head.weight"}
    state[names["head"]] = pipe.gpt.state_dict()["lm_head.weight"]
    for key in (names["decoder"] + "embed_tokens.weight", names["head"]):   # + the "<image>" row
        state[key] = torch.cat([state[key], torch.zeros(1, state[key].shape[1])])
    state |= {k: v for k, v in ref.state_dict().items() if k.startswith(names["vq"])}   # its own (unused) VQ
    ref.load_state_dict(state, strict=True)
    return ref


def transformers_draw(ref, pipe, captions: list[str], seed: int) -> torch.Tensor:
    """Codes (B, h, w) drawn by transformers' generate() with the checkpoint's sampling (CFG through
    negative_prompt_ids, Emu3's prefix_allowed_tokens_fn as the grid constraint), one call per run of captions of the
    same token length (no padding needed). The captions' prompts are the ones nano_emu's Pipeline builds."""
    layout, (h, w) = pipe.layout, pipe.grid()
    g, sampling = pipe.guidance.cfg_scale, pipe.sampling
    prompts = [layout.generation_prompt(c + pipe.prompt_suffix, h, w, pipe.tokenizer) for c in captions]
    negative = layout.generation_prompt(pipe.negative_prompt, h, w, pipe.tokenizer)
    n_new = len(layout.grid_schedule(h, w))
    codes = []
    for length, group in itertools.groupby(prompts, key=len):
        ids = torch.tensor(list(group))
        torch.manual_seed(seed)
        out = ref.generate(ids, attention_mask=torch.ones_like(ids),
                           negative_prompt_ids=torch.tensor([negative] * len(ids)),
                           guidance_scale=g, prefix_allowed_tokens_fn=emu3_allowed_tokens(layout, h, w, length - 1),
                           do_sample=sampling.temperature > 0, temperature=sampling.temperature or None,
                           top_k=sampling.top_k or 0, top_p=sampling.top_p or 1.0, max_new_tokens=n_new + 5,
                           eos_token_id=layout.eos, pad_token_id=layout.pad)[:, length:]
        for row in out:
            visual = row[(row >= layout.first_visual) & (row < layout.vocab_size)][:h * w]
            codes.append((visual - layout.first_visual).view(h, w))
    return torch.stack(codes)


def emu3_allowed_tokens(layout: Layout, h: int, w: int, img_index: int):
    """Emu3's prefix_allowed_tokens_fn (image_generation.py): the offset from IMG decides what may come next."""
    visual = list(range(layout.first_visual, layout.vocab_size))

    def allowed(batch_id, input_ids):
        offset = input_ids.shape[0] - img_index
        if offset <= (w + 1) * h and offset % (w + 1) == 0:
            return [layout.eol]
        after = {(w + 1) * h + 1: layout.eof, (w + 1) * h + 2: layout.eoi, (w + 1) * h + 3: layout.eos}
        return [after.get(offset, layout.pad)] if offset > (w + 1) * h else visual

    return allowed
