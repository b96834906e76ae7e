#!/bin/bash
# In place vs new gradient buffer (notes/NEXT.md item 1): the loss kernel's hint variants both
# ways (fused_sweep --new), then ncu of one call each way under the harness's conditions
# (caches and clocks left alone). Device usage: bash benchmarks/inplace_probe.sh
export PYTHONPATH=src:tests
SWEEP_V=${SWEEP_V:-32000,128256,262144}
VARIANTS=${VARIANTS:-"hints=1;hints=3;hints=4;hints=5;hints=6;hints=7;hints=2;reverse=1"}
NCU_V=${NCU_V:-262144}
python benchmarks/fused_sweep.py --V "$SWEEP_V" --configs "" --new --variants "$VARIANTS" \
    2>&1 | tee "${OUT:-/tmp}/sweep.txt" | grep -v Warning
M=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum
M=$M,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum
M=$M,lts__t_sectors_srcunit_tex_op_write.sum,l1tex__t_sector_hit_rate.pct
M=$M,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld_lookup_hit.sum
M=$M,smsp__average_warp_latency_issue_stalled_long_scoreboard.ratio
M=$M,smsp__average_warp_latency_issue_stalled_lg_throttle.ratio
M=$M,smsp__average_warp_latency_issue_stalled_barrier.ratio
M=$M,smsp__average_warp_latency_issue_stalled_drain.ratio
M=$M,smsp__average_warp_latency_issue_stalled_membar.ratio
for V in ${NCU_V//,/ }; do
  for mode in inplace new; do
    echo "== ncu V=$V $mode"
    timeout 240 ncu --cache-control none --clock-control none \
        --kernel-name regex:_fused_rows_kernel --launch-skip 1 --launch-count 1 \
        --metrics "$M" python3 benchmarks/ncu_fused.py "$V" "$mode" 2>&1 \
        | grep -E "^\s+(gpu__|dram__|lts__|l1tex__|smsp__)|ERR|rror" | head -30
  done
done
