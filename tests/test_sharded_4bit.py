"""Weight4bit: a 4-bit weight FSDP2 shards by rows, all-gathers byte for byte and frees again (lesson 10)."""

import pytest
import torch
from torch import nn

from qlora_ref import QLoRALinear, dequantize_4bit, quantize_4bit
from qlora_ref.distributed import run_on_cpus
from qlora_ref.sharded_4bit import ShardableQLoRALinear, Weight4bit, check_rows_shardable, make_shardable


def _weight(rows=256, cols=256, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_a_shard_is_the_quantization_of_its_rows(world_size, double_quant):
    W = _weight()
    packed, state = quantize_4bit(W, double_quant=double_quant)
    whole = Weight4bit.from_quantized(packed, state)
    shards = torch.chunk(whole, world_size)
    reference = dequantize_4bit(packed, state)
    rows = W.shape[0] // world_size
    for k, shard in enumerate(shards):
        assert isinstance(shard, Weight4bit) and shard.shape == (rows, W.shape[1])
        assert torch.equal(shard.dequantize(), reference[k * rows:(k + 1) * rows])
    # the shards' streams, end to end, are the single-process bytes
    for i, stream in enumerate(whole.streams()):
        assert torch.equal(torch.cat([s.streams()[i] for s in shards]), stream)
    assert torch.equal(torch.cat([s.packed() for s in shards]), packed)


def test_fsdp2_padding_path_copies_a_shard_whole():
    whole = Weight4bit.quantize(_weight())
    shard = torch.chunk(whole, 2)[1]
    padded = whole.new_zeros((128, 256))  # what FSDP2 does: zeros of the shard's size, the shard copied in
    padded.narrow(0, 0, 128).copy_(shard)
    assert torch.equal(padded.dequantize(), shard.dequantize())
    assert torch.equal(padded.offset, whole.offset)


def test_unshardable_sizes_say_which_world_sizes_fit():
    # 128 x 128 = 16384 values: one nested block (256 x 64) in all, so only one rank can hold it
    with pytest.raises(ValueError, match=r"cannot be sharded over 2 ranks.*world sizes that divide it: \[1\].*"
                                         r"double_quant=False"):
        check_rows_shardable((128, 128), 64, True, 2, "q_proj")
    check_rows_shardable((128, 128), 64, False, 2)  # plain blocks of 64: 64 rows x 128 values are whole blocks
    with pytest.raises(ValueError, match="3 ranks.*85.3333 rows"):
        check_rows_shardable((256, 256), 64, False, 3)
    with pytest.raises(ValueError, match="after row 64 would split a block of 16384 values"):
        torch.chunk(Weight4bit.quantize(_weight(128, 128)), 2)


def test_every_other_operation_is_refused_by_name():
    w = Weight4bit.quantize(_weight(64, 64), double_quant=False)
    with pytest.raises(NotImplementedError, match="aten.add.Tensor is not defined on a Weight4bit"):
        w + 1
    with pytest.raises(NotImplementedError, match="aten.t.default"):  # F.linear(x, w) would start by transposing
        torch.nn.functional.linear(torch.ones(2, 64), w)
    with pytest.raises(NotImplementedError, match="along dim 0"):
        torch.chunk(w, 2, dim=1)


def test_shardable_layer_computes_what_qlora_linear_computes():
    torch.manual_seed(0)
    layer = QLoRALinear(nn.Linear(256, 256), r=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 3, 256, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    before = [t.grad.clone() for t in (x, layer.lora_A.weight, layer.lora_B.weight)]
    for t in (x, layer.lora_A.weight, layer.lora_B.weight):
        t.grad = None
    ShardableQLoRALinear.from_qlora(layer)
    assert isinstance(layer.weight, Weight4bit) and not layer.weight.requires_grad
    assert [n for n, _ in layer.named_buffers()] == []
    y2 = layer(x)
    y2.square().sum().backward()
    assert torch.equal(y, y2)
    for a, t in zip(before, (x, layer.lora_A.weight, layer.lora_B.weight)):
        assert torch.equal(a, t.grad)


def _blocks(seed=0):
    """Two blocks of two 256 x 256 QLoRA layers (nested constants), adapters B nonzero, built the same everywhere."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Sequential(QLoRALinear(nn.Linear(256, 256, bias=False), r=8), nn.GELU(),
                                          QLoRALinear(nn.Linear(256, 256, bias=False), r=8)) for _ in range(2)])
    for layer in model.modules():
        if isinstance(layer, QLoRALinear):
            with torch.no_grad():
                layer.lora_B.weight.normal_()
    make_shardable(model)
    return model


def _gathers_exact_bytes(rank, world_size):
    """Worker: fully_shard each block; check the bytes seen in forward and backward, and that they are freed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    model, reference = _blocks(), _blocks()
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    layers = [m for m in model.modules() if isinstance(m, ShardableQLoRALinear)]
    whole = [m.weight for m in reference.modules() if isinstance(m, ShardableQLoRALinear)]
    local = layers[0].weight._local_tensor
    assert isinstance(local, Weight4bit) and local.shape == (256 // world_size, 256)
    assert local.codes.numel() == whole[0].codes.numel() // world_size

    seen = []  # (pass, layer index, all streams equal, offset equal)

    def check(phase, i):
        def hook(module, *_):
            w = module.weight
            assert isinstance(w, Weight4bit) and w.shape == (256, 256), f"{phase}: {type(w).__name__}"
            same = all(torch.equal(a, b) for a, b in zip(w.streams(), whole[i].streams()))
            seen.append((phase, i, same, torch.equal(w.offset, whole[i].offset)))
        return hook

    gathered = []
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(check("forward", i))
        layer.register_full_backward_pre_hook(check("backward", i))
        layer.register_forward_hook(lambda m, *_: gathered.append(m.weight))
    # each rank its own rows of the batch (data parallel): the reference runs the whole batch
    x = torch.randn(4 * world_size, 256, generator=torch.Generator().manual_seed(1))
    mine = x.chunk(world_size)[rank]
    y = model(mine)
    freed_after_forward = [w.codes.untyped_storage().size() for w in gathered]
    y.square().sum().backward()
    freed_after_backward = [w.codes.untyped_storage().size() for w in gathered]
    y_ref = reference(x)
    (y_ref.square().sum() / world_size).backward()  # FSDP2 averages the ranks' gradients
    grads = {}
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if p.requires_grad:
            grads[name] = (p.grad.full_tensor() - q.grad).abs().max().item() / q.grad.abs().max().item()
    return {"seen": seen, "freed": freed_after_forward + freed_after_backward,
            "y": torch.equal(y, y_ref.chunk(world_size)[rank]), "grads": grads}


@pytest.mark.parametrize("world_size", [1, 2, 4])  # 1: FSDP2 copies instead of all-gathering, one input only
def test_fsdp2_all_gathers_the_exact_bytes_and_frees_them(world_size):
    for result in run_on_cpus(_gathers_exact_bytes, world_size, start_method="fork"):
        assert len(result["seen"]) == 8  # 4 layers, gathered for forward and again for backward
        assert all(same and offset for _, _, same, offset in result["seen"])
        assert {phase for phase, *_ in result["seen"]} == {"forward", "backward"}
        assert result["freed"] == [0] * 8  # reshard_after_forward: no rank keeps a gathered weight
        assert result["y"]  # each row's output depends only on that row and the (exact) weights
        # the adapters' gradients: the reference sums the whole batch in one GEMM, FSDP2 each rank's rows and
        # then the ranks; float32 sums in another order agree to a few ulps
        assert result["grads"] and max(result["grads"].values()) < 1e-5
