"""Prefix sharing gives the plain path's per-completion log-probs and gradients (fp32)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alignlab.data.preference_batches import add_kl_completions, collate_groups
from alignlab.models._fast.packed_groups import group_layout
from alignlab.models.logprobs import completion_logprobs, fast_path, preferred_layout

from tests.conftest import random_llama


def _ids(g: torch.Generator, lo: int, hi: int) -> list[int]:
    n = int(torch.randint(lo, hi, (1,), generator=g))
    return torch.randint(1, 64, (n,), generator=g).tolist()


def _examples(kind: str, n: int = 5) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    if kind == "varied":  # prompts from 3 to 70 tokens: several length buckets; 1 to 4 completions
        return [{"prompt_ids": _ids(g, lo, lo + 4), "completion_ids": [_ids(g, 1, 20) for _ in range(1 + i % 4)],
                 "scores": [float(-j) for j in range(1 + i % 4)]}
                for i, lo in enumerate((3, 70, 20, 40, 66, 5))]
    if kind == "paired":
        return [{"prompt_ids": _ids(g, 2, 12), "chosen_ids": _ids(g, 1, 7),
                 "rejected_ids": _ids(g, 1, 9)} for _ in range(n)]
    if kind == "unpaired":
        ex = [{"prompt_ids": _ids(g, 2, 12), "completion_ids": _ids(g, 1, 7), "label": i % 2 == 0}
              for i in range(n)]
        add_kl_completions(ex, seed=0)
        return ex
    # lists of uneven length K (2 to 4)
    return [{"prompt_ids": _ids(g, 2, 12), "completion_ids": [_ids(g, 1, 7) for _ in range(2 + i % 3)],
             "scores": [float(-j) for j in range(2 + i % 3)]} for i in range(n)]


def _values_and_grads(model, examples, layout):
    model.zero_grad()
    batch = collate_groups(examples, pad_token_id=0, layout=layout)
    lp = completion_logprobs(model, batch)
    weights = torch.linspace(-1.0, 2.0, lp.numel())  # a generic downstream loss
    (lp * weights).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return lp.detach(), grads, batch


class _Ops(TorchDispatchMode):
    """Records the aten ops that run, with their first argument's dtype."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, torch.dtype | None, int]] = []  # name, dtype, dims

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self.seen.append((str(func.overloadpacket.__name__), None if first is None else first.dtype,
                          0 if first is None else first.dim()))
        return func(*args, **(kwargs or {}))

    def count(self, name: str) -> int:
        return sum(n == name for n, _, _ in self.seen)


@pytest.mark.parametrize("kind", ["paired", "unpaired", "listwise", "varied"])
def test_prefix_sharing_matches_plain_values_and_gradients(kind):
    model = random_llama(seed=1).float()
    examples = _examples(kind)
    lp_s, g_s, batch = _values_and_grads(model, examples, "shared")
    lp_f, g_f, _ = _values_and_grads(model, examples, "flat")
    lp_p, g_p, _ = _values_and_grads(model, examples, "packed")
    assert lp_s.shape == (len(batch["owner"]),)
    assert torch.allclose(lp_s, lp_f, atol=1e-5, rtol=0), (lp_s - lp_f).abs().max()
    assert torch.allclose(g_s, g_f, atol=1e-5, rtol=0), (g_s - g_f).abs().max()
    assert torch.allclose(lp_p, lp_f, atol=1e-5, rtol=0)
    assert g_f.abs().max() > 1e-3  # the comparison is not between zeros


def test_prefix_sharing_with_grouped_query_heads_matches_plain():
    """Keys and values of fewer heads than the queries (grouped-query attention) are gathered
    for every query head: the shared pass equals the plain one, values and gradients."""
    model = random_llama(seed=3).float()
    model.config.num_key_value_heads = 2
    model = type(model)(model.config)  # rebuilt with 2 key/value heads for 4 query heads
    assert model.model.layers[0].self_attn.k_proj.out_features == 2 * 8
    examples = _examples("varied")
    lp_s, g_s, _ = _values_and_grads(model, examples, "shared")
    lp_f, g_f, _ = _values_and_grads(model, examples, "flat")
    assert torch.allclose(lp_s, lp_f, atol=1e-5, rtol=0) and torch.allclose(g_s, g_f, atol=1e-5, rtol=0)
    assert g_f.abs().max() > 1e-3


def test_group_attention_writes_each_token_once_and_zeros_to_fillers():
    """GroupAttention's one gather back: every real token's output comes from its own block
    (checked against attention computed row by row), and the filler rows after the real tokens
    get zeros; their gradients never reach the inputs."""
    import torch.nn.functional as F

    from alignlab.models._fast.block_attention import GroupAttention
    from alignlab.models._fast.packed_groups import group_layout

    batch = collate_groups(_examples("varied"), pad_token_id=0, layout="shared")
    lay = group_layout(batch)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, lay.length, 4, generator=g, requires_grad=True) for _ in range(3))
    with GroupAttention(lay):
        out = F.scaled_dot_product_attention(q, k, v)
    real = torch.zeros(lay.length, dtype=torch.bool)
    for b in lay.blocks:
        real[b.dest] = True
    assert real.sum() < lay.length  # the layout has fillers
    assert torch.equal(out[0][:, ~real], torch.zeros_like(out[0][:, ~real]))
    # a prompt token attends its prompt's earlier tokens only
    first = lay.blocks[0]
    row = first.queries[0][first.real[0]]
    want = F.scaled_dot_product_attention(q[:, :, row], k[:, :, row], v[:, :, row], is_causal=True)
    assert torch.allclose(out[:, :, row], want, atol=1e-6)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    assert torch.equal(q.grad[0][:, ~real], torch.zeros_like(q.grad[0][:, ~real]))
    assert q.grad[0][:, real].abs().max() > 0


def test_slot_major_order_and_direct_value():
    """Completion n of the batch is slot n // B of example n % B; its value is a direct sum."""
    model = random_llama(seed=2).float().eval()
    examples = _examples("paired", n=3)
    batch = collate_groups(examples, pad_token_id=0, layout="shared")
    assert batch["owner"].tolist() == [0, 1, 2, 0, 1, 2]
    assert batch["slot"].tolist() == [0, 0, 0, 1, 1, 1]
    with torch.no_grad():
        lp = completion_logprobs(model, batch)
        e = examples[1]
        ids = torch.tensor([e["prompt_ids"] + e["rejected_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        p = len(e["prompt_ids"])
        direct = sum(logp[t - 1, ids[0, t]] for t in range(p, ids.shape[1]))
    assert lp[4].item() == pytest.approx(direct.item(), abs=1e-5)


def test_support_refuses_sliding_window_models():
    model = random_llama()
    assert preferred_layout(model)[0] == "shared"
    model.config.sliding_window = 8
    layout, why = preferred_layout(model)
    assert layout == "flat" and "sliding_window" in why
    batch = collate_groups(_examples("paired"), 0, layout="shared")
    assert fast_path(model, batch).name == "plain" and "sliding_window" in fast_path(model, batch).reason


def test_cpu_training_attention_matches_sdpa_values_and_gradients():
    """The matmul attention used for CPU training equals SDPA (causal, boolean and float masks,
    grouped KV heads), and dropout calls are left to SDPA."""
    import torch.nn.functional as F

    from alignlab.models._fast.cpu_attention import CpuAttention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 7, 8, generator=g, requires_grad=True) for _ in range(2))
    keep = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    keep[..., 0] = True  # no fully masked row
    cases = [dict(is_causal=True), dict(attn_mask=keep),
             dict(attn_mask=torch.where(keep, 0.0, -1e4)), dict(attn_mask=keep, scale=0.3)]
    for kw in cases:
        outs = []
        for mode in (False, True):
            with (CpuAttention() if mode else contextlib.nullcontext()):
                out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
            grads = torch.autograd.grad((out * torch.arange(8.0)).sum(), (q, k, v))
            outs.append((out.detach(), grads))
        (o0, g0), (o1, g1) = outs
        assert torch.allclose(o0, o1, atol=1e-5), kw
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g0, g1)), kw


def test_cpu_training_attention_bf16_and_fully_masked_rows():
    """In bfloat16 it stays within bf16 rounding of float32 SDPA; a fully masked query row (a pad)
    gives finite values and gradients instead of NaN, and float32's -inf-like additive masks
    survive the cast to bfloat16."""
    import torch.nn.functional as F

    from alignlab.models._fast.cpu_attention import matmul_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 6, 16, generator=g) for _ in range(3))
    keep = torch.rand(2, 1, 6, 6, generator=g) > 0.4
    keep[..., 0] = True
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    additive = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    for mask in (keep, additive):
        got = matmul_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask)
        assert got.dtype == torch.bfloat16
        assert torch.allclose(got.float(), want, atol=0.05), (got.float() - want).abs().max()
    keep[0, 0, 2] = False  # query 2 of row 0 sees nothing
    qb = q.bfloat16().requires_grad_()
    out = matmul_attention(qb, k.bfloat16(), v.bfloat16(), attn_mask=keep)
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all() and torch.isfinite(qb.grad.float()).all()


def test_one_pass_runs_last_layer_mlp_only_where_hidden_states_are_read():
    """The SDPA group pass runs the decoder once on the real tokens only (no padding work), its
    last MLP only at the positions that predict a scored token, and the model's modules are
    restored afterwards."""
    from alignlab.models._fast.packed_groups import LENGTH_MULTIPLE

    model = random_llama(seed=1).float()
    examples = _examples("paired", n=12)
    first, last = model.model.layers[0], model.model.layers[-1]
    mlp, o_proj, q_proj = last.mlp, last.self_attn.o_proj, last.self_attn.q_proj
    seen = {"first": [], "last": []}
    hooks = [m.register_forward_hook(lambda m, i, o, key=key: seen[key].append(i[0].reshape(-1, i[0].shape[-1]).shape[0]))
             for key, m in (("first", first.mlp), ("last", mlp))]
    batch = collate_groups(examples, pad_token_id=0, layout="shared")
    completion_logprobs(model, batch)
    for h in hooks:
        h.remove()
    real = sum(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    predicting = sum(1 + len(e["chosen_ids"]) - 1 + len(e["rejected_ids"]) - 1 for e in examples)
    # up to LENGTH_MULTIPLE - 1 filler rows round the shapes (packed_groups.LENGTH_MULTIPLE)
    assert len(seen["first"]) == len(seen["last"]) == 1
    assert 0 <= seen["first"][0] - real < LENGTH_MULTIPLE
    assert 0 <= seen["last"][0] - predicting < LENGTH_MULTIPLE
    assert last.mlp is mlp and last.self_attn.o_proj is o_proj and last.self_attn.q_proj is q_proj


@pytest.mark.parametrize("kind", ["paired", "listwise"])
def test_two_pass_fallback_without_sdpa(kind):
    """A decoder on eager attention takes the two-pass path (prompt pass with KV cache, then
    the completions): the same values and gradients as the plain path, the last MLP one row per
    prompt in the prompt pass."""
    model = random_llama(seed=1).float()
    model.set_attn_implementation("eager")
    examples = _examples(kind)
    assert fast_path(model, collate_groups(examples, 0, layout="shared")).name == "two_pass"
    rows_seen = []
    handle = model.model.layers[-1].mlp.register_forward_hook(
        lambda m, i, o: rows_seen.append(i[0].reshape(-1, i[0].shape[-1]).shape[0]))
    lp_s, g_s, batch = _values_and_grads(model, examples, "shared")
    handle.remove()
    lp_f, g_f, _ = _values_and_grads(model, examples, "flat")
    assert rows_seen == [len(examples), batch["completion_ids"].numel()]
    assert torch.allclose(lp_s, lp_f, atol=1e-5, rtol=0)
    assert torch.allclose(g_s, g_f, atol=1e-5, rtol=0)


def test_group_pass_grouped_query_heads_and_bf16():
    """Grouped-query attention (fewer KV heads) gives the plain path's values and gradients, and
    under bf16 autocast the one-pass values stay within bf16 rounding of the float32 ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignlab.core.runtime import autocast

    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                      pad_token_id=0)
    model = LlamaForCausalLM(cfg).float()
    examples = _examples("listwise")
    lp_s, g_s, batch = _values_and_grads(model, examples, "shared")
    lp_f, g_f, _ = _values_and_grads(model, examples, "flat")
    assert torch.allclose(lp_s, lp_f, atol=1e-5, rtol=0)
    assert torch.allclose(g_s, g_f, atol=1e-5, rtol=0)
    with torch.no_grad(), autocast(torch.device("cpu"), "bf16"):
        lp_b = completion_logprobs(model, batch)
    assert lp_b.dtype == torch.float32
    assert torch.allclose(lp_b, lp_f, rtol=0.02, atol=0.1), (lp_b - lp_f).abs().max()


def test_group_pass_with_attention_dropout():
    """A model trained with attention dropout runs (through SDPA with the block mask) and, in
    eval mode, matches the plain path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(6)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=128,
                      pad_token_id=0, attention_dropout=0.5)
    model = LlamaForCausalLM(cfg).float()
    examples = _examples("paired")
    completion_logprobs(model.train(), collate_groups(examples, 0, layout="shared")).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    lp_s, _, _ = _values_and_grads(model.eval(), examples, "shared")
    lp_f, _, _ = _values_and_grads(model, examples, "flat")
    assert torch.allclose(lp_s, lp_f, atol=1e-5)


@pytest.mark.parametrize("kind", ["unpaired", "varied"])
def test_group_pass_sdpa_branch_matches_plain(monkeypatch, kind):
    """Above ``MAX_SCORE_BYTES`` with autograd (and on GPUs) the group pass hands SDPA each padded
    block with its boolean mask instead of the CPU matmul attention: the same values and
    gradients. Without autograd the matmul attention runs whatever the size (it slices)."""
    import alignlab.models._fast.cpu_attention as cpu_attention

    monkeypatch.setattr(cpu_attention, "MAX_SCORE_BYTES", 0)
    model = random_llama(seed=1).float()
    examples = _examples(kind)
    with _Ops() as ops:
        lp_s, g_s, batch = _values_and_grads(model, examples, "shared")
    blocks = len(group_layout(batch).blocks)
    assert ops.count("_scaled_dot_product_flash_attention_for_cpu") == blocks * model.config.num_hidden_layers
    lp_f, g_f, _ = _values_and_grads(model, examples, "flat")
    assert torch.allclose(lp_s, lp_f, atol=1e-5) and torch.allclose(g_s, g_f, atol=1e-5)
    with torch.no_grad(), _Ops() as ops:
        lp_n = completion_logprobs(model, batch)
    assert ops.count("_scaled_dot_product_flash_attention_for_cpu") == 0 and ops.count("baddbmm") > 0
    assert torch.allclose(lp_n, lp_f, atol=1e-5)


def test_prompts_are_bucketed_by_length_and_completions_follow_their_prompt():
    """Prompts of very different lengths are padded per bucket, not to the batch's longest; each
    bucket's completions form one block reading that bucket's prompt keys, a row per prompt with
    its completions side by side."""
    from alignlab.models._fast.block_attention import AttentionBlock, PrefixedBlock, length_buckets

    # widths 128, 512, 512, 304, 144: 512² > 1.5·304², 304² > 1.5·144², 144² ≤ 1.5·128²
    assert length_buckets([128, 512, 500, 300, 130]) == [[1, 2], [3], [4, 0]]
    batch = collate_groups(_examples("varied"), 0, layout="shared")
    lay = group_layout(batch)
    prompts = [b for b in lay.blocks if isinstance(b, AttentionBlock)]
    completions = [b for b in lay.blocks if isinstance(b, PrefixedBlock)]
    assert sorted(b.queries.shape[1] for b in prompts) == [16, 32, 48, 80]  # not 4 × 80
    assert len(completions) == len(prompts)
    for c in completions:
        assert c.prefix_real.shape == prompts[c.prefix].real.shape
        assert c.queries.shape[1] % c.group == 0
    # every real token is attended from exactly one block
    dest = torch.cat([b.dest for b in lay.blocks])
    assert dest.numel() == dest.unique().numel() == int(batch["prompt_lengths"].sum() + batch["completion_mask"].sum())


def test_group_pass_attends_in_the_autocast_dtype():
    """Under bf16 autocast the pass casts queries, keys and values once and gathers them in
    bfloat16 (RoPE hands them over in float32): no float32 gather or score matrix."""
    from alignlab.core.runtime import autocast

    model = random_llama(seed=1).float()
    batch = collate_groups(_examples("varied"), 0, layout="shared")
    with torch.no_grad(), autocast(torch.device("cpu"), "bf16"), _Ops() as ops:
        completion_logprobs(model, batch)
    # the attention's gathers from [h, S', d] and its matmuls (the embedding's and the log-prob
    # gather's index_select are 2-D)
    attention = [d for n, d, dims in ops.seen if n in ("baddbmm", "bmm") or (n == "index_select" and dims == 3)]
    assert len(attention) > 10 and all(d == torch.bfloat16 for d in attention), set(attention)


def test_group_pass_on_a_lora_model():
    """A PEFT LoRA policy takes the one-pass prefix sharing and gets the plain path's values and
    adapter gradients."""
    peft = pytest.importorskip("peft")

    model = peft.get_peft_model(random_llama(seed=9).float(),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    examples = _examples("paired")
    assert fast_path(model, collate_groups(examples, 0, layout="shared")).name == "group_pass"
    out = []
    for layout in ("shared", "flat"):
        model.zero_grad()
        lp = completion_logprobs(model, collate_groups(examples, 0, layout=layout))
        (lp * torch.linspace(-1, 1, lp.numel())).sum().backward()
        out.append((lp.detach(), torch.cat([p.grad.flatten() for n, p in model.named_parameters()
                                            if "lora_" in n])))
    (lp_s, g_s), (lp_f, g_f) = out
    assert torch.allclose(lp_s, lp_f, atol=1e-5) and torch.allclose(g_s, g_f, atol=1e-5)


def _tiny_config(arch: str):
    import transformers as T

    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=128)
    return {
        "gpt2": lambda: T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                     bos_token_id=1, eos_token_id=2),
        "qwen2": lambda: T.Qwen2Config(num_key_value_heads=2, **common),
        "gemma": lambda: T.GemmaConfig(num_key_value_heads=1, head_dim=8, **common),
        "phi3": lambda: T.Phi3Config(num_key_value_heads=4, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=2, **common),
        "gpt_neox": lambda: T.GPTNeoXConfig(bos_token_id=1, eos_token_id=2, **common),
        "opt": lambda: T.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, ffn_dim=64, max_position_embeddings=128,
                                   word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2),
    }[arch]()


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gemma", "phi3", "gpt_neox", "opt"])
def test_group_pass_on_other_architectures(arch):
    """Learned absolute positions (GPT-2, OPT), rotary variants, grouped KV heads, fused QKV
    (Phi-3): the one-pass prefix sharing gives the plain path's values and gradients."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(arch)).float().eval()  # no dropout
    examples = _examples("listwise")
    assert fast_path(model, collate_groups(examples, 0, layout="shared")).name == "group_pass"
    lp_s, g_s, _ = _values_and_grads(model, examples, "shared")
    lp_f, g_f, _ = _values_and_grads(model, examples, "flat")
    assert torch.allclose(lp_s, lp_f, atol=1e-5) and torch.allclose(g_s, g_f, atol=1e-5)


def test_packed_sequences_attend_per_sequence_padded(monkeypatch):
    """A padding-free packed batch on an SDPA decoder runs its attention per sequence (padded
    rows, not transformers' dense [S, S] block mask): the padded path's values and gradients,
    under a sliding window it keeps transformers' mask."""
    import alignlab.models._fast.packed_groups as packed_groups

    calls = []
    real = packed_groups.packed_sequences_hidden
    monkeypatch.setattr(packed_groups, "packed_sequences_hidden",
                        lambda *a: calls.append(1) or real(*a))
    model = random_llama(seed=2).float()
    examples = _examples("listwise")
    lp_p, g_p, _ = _values_and_grads(model, examples, "packed")
    assert calls  # the per-sequence attention ran
    lp_f, g_f, _ = _values_and_grads(model, examples, "flat")
    assert torch.allclose(lp_p, lp_f, atol=1e-5) and torch.allclose(g_p, g_f, atol=1e-5)
    calls.clear()
    model.config.sliding_window = 4
    _values_and_grads(model, examples, "packed")
    assert not calls
