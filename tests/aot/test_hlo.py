"""gpt2_jax/aot/hlo.py: collectives and their bytes read from a compiled program's optimised HLO text."""
from gpt2_jax.aot import hlo

# A hand-written optimised module: a 3-step scan holding an all-gather, an async all-reduce pair and a
# Pallas kernel, a data-dependent while loop holding a collective-permute, and a reduce-scatter in a
# fusion of the entry.
HLO = """HloModule m, entry_computation_layout={()->f32[]}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_rs (p: f32[64,8]) -> f32[16,8] {
  %p = f32[64,8]{1,0} parameter(0)
  ROOT %reduce-scatter.1 = f32[16,8]{1,0:T(8,128)} reduce-scatter(%p), replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
}

%scan_body (t: (s32[], bf16[4,32])) -> (s32[], bf16[4,32]) {
  %t = (s32[], bf16[4,32]) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = bf16[4,32]{1,0} get-tuple-element(%t), index=1
  %all-gather.1 = bf16[16,32]{1,0:T(8,128)(2,1)} all-gather(%x), replica_groups={{0,1,2,3}}, dimensions={0}
  %all-reduce-start.1 = (bf16[4,32]{1,0}, bf16[4,32]{1,0}) all-reduce-start(%x), to_apply=%add
  %all-reduce-done.1 = bf16[4,32]{1,0} all-reduce-done(%all-reduce-start.1)
  %custom-call.1 = bf16[4,32]{1,0} custom-call(%x), custom_call_target="tpu_custom_call", backend_config="{}"
  ROOT %r = (s32[], bf16[4,32]) tuple(%i, %all-reduce-done.1)
}

%scan_cond (c: (s32[], bf16[4,32])) -> pred[] {
  %c = (s32[], bf16[4,32]) parameter(0)
  %n = s32[] constant(3)
  %j = s32[] get-tuple-element(%c), index=0
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

%loop_body (u: (s32[], f32[2])) -> (s32[], f32[2]) {
  %u = (s32[], f32[2]) parameter(0)
  %v = f32[2]{0} get-tuple-element(%u), index=1
  %collective-permute.1 = f32[2]{0} collective-permute(%v), source_target_pairs={{0,1},{1,0}}
  %k = s32[] get-tuple-element(%u), index=0
  ROOT %o = (s32[], f32[2]) tuple(%k, %collective-permute.1)
}

%loop_cond (w: (s32[], f32[2])) -> pred[] {
  %w = (s32[], f32[2]) parameter(0)
  %g = f32[2]{0} get-tuple-element(%w), index=1
  %h = f32[] constant(0)
  %slice = f32[1]{0} slice(%g), slice={[0:1]}
  %rs = f32[] reshape(%slice)
  ROOT %gt = pred[] compare(%rs, %h), direction=GT
}

ENTRY %main () -> f32[] {
  %z = f32[64,8]{1,0} constant({...})
  %fusion.1 = f32[16,8]{1,0} fusion(%z), kind=kCustom, calls=%fused_rs
  %init = (s32[], bf16[4,32]) constant({...})
  %while.1 = (s32[], bf16[4,32]) while(%init), condition=%scan_cond, body=%scan_body
  %init2 = (s32[], f32[2]) constant({...})
  %while.2 = (s32[], f32[2]) while(%init2), condition=%loop_cond, body=%loop_body
  ROOT %zero = f32[] constant(0)
}
"""


def test_collectives_count_scan_bodies_per_iteration():
    out = hlo.collectives(HLO)
    c = out["collectives"]
    assert c["all-gather"] == {"count": 3, "bytes": 3 * 16 * 32 * 2}
    assert c["all-reduce"] == {"count": 3, "bytes": 3 * 4 * 32 * 2}  # the async pair counts once, at -done
    assert c["reduce-scatter"] == {"count": 1, "bytes": 16 * 8 * 4}
    assert c["collective-permute"] == {"count": 1, "bytes": 2 * 4}  # a data-dependent loop: body once
    assert c["all-to-all"] == {"count": 0, "bytes": 0}
    assert out["while_loops"] == {"3": 1, "unknown": 1}
    assert out["loops_counted_once"] == ["while.2"]
    assert out["pallas_kernels"] == 3


def test_shape_bytes():
    assert hlo.shape_bytes("(bf16[16,32]{1,0:T(8,128)(2,1)}, f32[], s32[2]{0})") == 16 * 32 * 2 + 4 + 8
