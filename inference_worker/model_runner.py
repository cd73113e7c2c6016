"""Turns a scheduled step into model inputs, runs the model, returns one logits row per sequence.

Owns the paged KV cache and the static per-step input buffers (allocated once; each
step fills a prefix of them, so a decode step can later be captured in a CUDA graph).
Step layout: prefills sorted by adapter slot, then decodes sorted by slot, so each
slot's tokens are contiguous (LoRA segments) and prefill tokens come before decode
tokens (attention.py). A decode-only step on CUDA is padded to a graph bucket and
replayed (cuda_graphs.py); every other step on CUDA is padded to a token bucket and runs as
piecewise graphs with eager attention between them (prompt_graphs.py), or eagerly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from inference_worker.attention import AttentionMeta
from inference_worker.block_manager import blocks_for
from inference_worker.cuda_graphs import DecodeGraphs, LoraVariant, lora_tile, rank_bound_for, table_width
from inference_worker.lora.metadata import LoraBatchMeta, segments_of
from inference_worker.lora.slot_pool import SlotPool
from inference_worker.model.llama import LlamaForCausalLM, PieceBuffers
from inference_worker.prompt_graphs import PROMPT_SHRINK_TILE, PROMPT_TILE, PromptGraphs
from inference_worker.sequence import Sequence
from kernels.tiles import segment_table_width


@dataclass
class StepBatch:
    seqs: list[Sequence]                  # step order: logits row i belongs to seqs[i]
    input_ids: torch.Tensor               # [T] int64
    positions: torch.Tensor               # [T] int64
    logits_indices: torch.Tensor          # [B] int64 last token of each sequence in [0, T)
    attn: AttentionMeta
    lora: LoraBatchMeta
    graph_bucket: int | None = None       # decode-only step padded to this CUDA-graph bucket
    prompt_bucket: int | None = None      # other step padded to this token bucket of the prompt graphs
    num_tokens: int = 0                   # T, padding excluded


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, slot_pool: SlotPool, num_kv_blocks: int, block_size: int,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 cuda_graph_buckets: tuple[int, ...] | None = None, lora_overlap: bool = False,
                 prompt_graph_buckets: tuple[int, ...] | None = None) -> None:
        spec = model.spec
        weight = model.embed_tokens.weight
        self.model, self.slot_pool, self.block_size = model, slot_pool, block_size
        self.device, self.dtype = weight.device, weight.dtype
        cache_shape = (num_kv_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = [(torch.zeros(cache_shape, device=self.device, dtype=self.dtype),
                           torch.zeros(cache_shape, device=self.device, dtype=self.dtype))
                          for _ in range(spec.num_layers)]
        self.max_blocks_per_seq = blocks_for(max_model_len, block_size)
        # Static inputs (device) and their host staging (pinned on CUDA: async uploads), filled
        # through numpy views of the staging (a list into numpy costs ~1 µs, a torch.tensor ~5).
        sizes = {"input_ids": (max_num_batched_tokens, torch.int64), "positions": (max_num_batched_tokens, torch.int64),
                 "slot_mapping": (max_num_batched_tokens, torch.int64), "logits_indices": (max_num_seqs, torch.int64),
                 "cu_seqlens": (max_num_seqs + 1, torch.int32), "context_lens": (max_num_seqs, torch.int32),
                 "seg_indptr": (max_num_seqs + 1, torch.int32), "seg_slots": (max_num_seqs, torch.int32),
                 "block_tables": (max_num_seqs * self.max_blocks_per_seq, torch.int32),
                 "gather_dst": (max_num_seqs, torch.int64), "gather_src": (max_num_seqs, torch.int64)}
        pin = self.device.type == "cuda"
        self._dev = {k: torch.zeros(n, dtype=dt, device=self.device) for k, (n, dt) in sizes.items()}
        # Two staging sets, alternating per step: with async scheduling a step is prepared while
        # the previous one's uploads may not have run yet (the host waited only for the one before)
        self._host_sets = [{k: torch.zeros(n, dtype=dt, pin_memory=pin) for k, (n, dt) in sizes.items()}
                           for _ in range(2)]
        self._host_np_sets = [{k: t.numpy() for k, t in host.items()} for host in self._host_sets]
        self._host, self._host_np = self._host_sets[0], self._host_np_sets[0]
        # the newest step's sampled tokens on the device [B]: inputs of decodes whose last token
        # is still pending (async scheduling), gathered by row (Sequence.pending_row)
        self.prev_tokens: torch.Tensor | None = None
        # eager steps' SGMV segment-table width: one for every G <= max_num_seqs (lora/warmup.py)
        self.eager_block_g = segment_table_width(max_num_seqs)
        self.graphs: DecodeGraphs | None = None
        buckets = tuple(b for b in cuda_graph_buckets or () if b <= max_num_seqs)
        prompt_buckets = tuple(b for b in prompt_graph_buckets or () if b <= max_num_batched_tokens)
        # the graphs' second stream for LoRA shrinks (LoraBatchMeta.side_stream)
        self._lora_stream = torch.cuda.Stream(self.device) if lora_overlap and (buckets or prompt_buckets) else None
        self.max_num_seqs = max_num_seqs
        if buckets:
            self.graphs = DecodeGraphs(buckets, slot_pool.max_rank)
            self._capture_graphs()
        self.prompt_graphs: PromptGraphs | None = None
        self._pieces: PieceBuffers | None = None
        if prompt_buckets:
            self.attach_prompt_graphs(PromptGraphs(prompt_buckets, spec.num_layers + 1))
            self._capture_prompt_graphs()

    @property
    def kv_cache_bytes(self) -> int:
        return sum(2 * k.numel() * k.element_size() for k, _ in self.kv_caches)

    def _upload(self, name: str, values) -> torch.Tensor:
        """Copy values into the first len(values) entries of a static buffer; return that view."""
        n = len(values)
        self._host_np[name][:n] = values
        return self._dev[name][:n].copy_(self._host[name][:n], non_blocking=True)

    def prepare(self, prefills: list[Sequence], decodes: list[Sequence]) -> StepBatch:
        """Host-side work of a step (reads sequences: call under the engine's lock)."""
        bs = self.block_size
        flip = self._host is self._host_sets[0]
        self._host, self._host_np = self._host_sets[flip], self._host_np_sets[flip]
        prefills = sorted(prefills, key=lambda s: s.slot)
        decodes = sorted(decodes, key=lambda s: s.slot)
        bucket = prompt_bucket = None
        if self.graphs is not None and decodes and not prefills:
            bucket = self.graphs.bucket_for(len(decodes))
        num_rows = bucket or len(decodes)         # decode rows, padding included
        num_pad = num_rows - len(decodes)
        input_ids, positions, slot_mapping, cu_seqlens, logits_indices = [], [], [], [0], []
        for seq in prefills:
            assert not seq.num_pending, "a prefill needs all its tokens on the host"
            n, table = seq.num_tokens, seq.block_table
            input_ids += seq.all_token_ids
            positions += range(n)
            slot_mapping += [table[p // bs] * bs + p % bs for p in range(n)]
            cu_seqlens.append(cu_seqlens[-1] + n)
            logits_indices.append(cu_seqlens[-1] - 1)
        num_prefill_tokens = cu_seqlens[-1]
        width = self.max_blocks_per_seq
        block_tables = self._host_np["block_tables"][: num_rows * width].reshape(num_rows, width)
        context_lens, gather_dst, gather_src = [], [], []
        for j, seq in enumerate(decodes):
            n, table = seq.num_tokens, seq.block_table
            if seq.num_pending:                                # its input is still on the device
                gather_dst.append(num_prefill_tokens + j)
                gather_src.append(seq.pending_row)
                input_ids.append(0)
            else:
                input_ids.append(seq.output_token_ids[-1])     # a decode follows a sampled token
            positions.append(n - 1)
            slot_mapping.append(table[(n - 1) // bs] * bs + (n - 1) % bs)
            block_tables[j, : len(table)] = table
            context_lens.append(n)
        logits_indices += range(num_prefill_tokens, num_prefill_tokens + len(decodes))
        seqs = prefills + decodes
        indptr, seg_slots = segments_of([s.slot for s in seqs], [s.num_new_tokens for s in seqs])
        num_tokens = num_prefill_tokens + len(decodes)          # padding excluded
        tile, shrink_tile, padded, seg_width = None, None, num_tokens, len(seg_slots)
        if bucket is not None:
            context_lens += [0] * num_pad                         # padding rows: empty context
            logits_indices += range(len(decodes), num_rows)
            lora_segs = [g for g, slot in enumerate(seg_slots) if slot >= 0]
            tile = lora_tile(sum(indptr[g + 1] - indptr[g] for g in lora_segs), len(lora_segs))
            padded = num_rows
            if tile is not None:                                  # that graph's G (cuda_graphs.table_width)
                seg_width = table_width(bucket, tile)
        elif self.prompt_graphs is not None:
            prompt_bucket = self.prompt_graphs.bucket_for(num_tokens)
            if prompt_bucket is not None:                         # the prompt graphs' G: max_num_seqs
                tile, shrink_tile = PROMPT_TILE, PROMPT_SHRINK_TILE
                padded, seg_width = prompt_bucket, self.max_num_seqs
        # a graph step's padding rows: no KV write (slot -1), base model (past the last segment);
        # the segment table padded with empty segments to the graph's G
        pad = padded - num_tokens
        input_ids += [0] * pad
        positions += [0] * pad
        slot_mapping += [-1] * pad
        if len(seg_slots) > seg_width:       # cannot happen (tests/engine/test_cuda_graphs.py); else a wrong result
            raise RuntimeError(f"{len(seg_slots)} segments overflow the graph's table of {seg_width}")
        indptr += [indptr[-1]] * (seg_width - len(seg_slots))
        seg_slots += [-1] * (seg_width - len(seg_slots))
        dev_tables = self._dev["block_tables"][: num_rows * width]
        dev_tables.copy_(self._host["block_tables"][: num_rows * width], non_blocking=True)
        attn = AttentionMeta(
            num_prefill_tokens=num_prefill_tokens, num_decodes=num_rows,
            slot_mapping=self._upload("slot_mapping", slot_mapping), cu_seqlens=self._upload("cu_seqlens", cu_seqlens),
            block_tables=dev_tables.view(num_rows, width), context_lens=self._upload("context_lens", context_lens),
            prefill_bounds=cu_seqlens, prefill_max_len=max((s.num_tokens for s in prefills), default=0))
        # the shrink's rank bound only for graph steps (decode), where it drops the padding programs;
        # prompt steps keep the pool's R: their split-K and block choices were tuned at R, and a
        # bound there changes them (fewer column blocks -> 16-way split-K) and JIT-compiles new variants
        step_rank = max((self.slot_pool.host_ranks[s.slot] for s in seqs if s.slot >= 0), default=0) \
            if bucket is not None else self.slot_pool.max_rank
        lora = LoraBatchMeta(
            has_lora=any(s >= 0 for s in seg_slots), seg_indptr=self._upload("seg_indptr", indptr),
            seg_slots=self._upload("seg_slots", seg_slots), slot_ranks=self.slot_pool.slot_ranks,
            slot_scales=self.slot_pool.slot_scales, block_t=tile, shrink_block_t=shrink_tile,
            rank_bound=rank_bound_for(step_rank, self.slot_pool.max_rank),
            block_g=self.eager_block_g if bucket is None else None)
        ids = self._upload("input_ids", input_ids)
        if gather_dst:
            ids.index_copy_(0, self._upload("gather_dst", gather_dst),
                            self.prev_tokens.index_select(0, self._upload("gather_src", gather_src)))
        return StepBatch(seqs=seqs, input_ids=ids,
                         positions=self._upload("positions", positions),
                         logits_indices=self._upload("logits_indices", logits_indices), attn=attn, lora=lora,
                         graph_bucket=bucket, prompt_bucket=prompt_bucket, num_tokens=num_tokens)

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """-> logits [B, V] float32, row i for batch.seqs[i]."""
        # on the device: the adapter copies of this step's slots
        self.slot_pool.wait_for_loads({s.slot for s in batch.seqs if s.slot >= 0})
        if batch.graph_bucket is not None:
            lora = batch.lora
            variant = (lora.block_t, lora.rank_bound) if lora.has_lora else None
            return self.graphs.replay(batch.graph_bucket, variant)[: len(batch.seqs)]
        if batch.prompt_bucket is not None:
            return self._prompt_graph_forward(batch)
        return self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attn, batch.lora,
                          batch.logits_indices)

    # ---- CUDA graphs ------------------------------------------------------------------
    def static_decode_forward(self, bucket: int, variant: LoraVariant | None) -> torch.Tensor:
        """The model over the static buffers' first `bucket` rows, as prepare fills them for a
        padded decode step, LoRA with `variant` = (token tile, rank bound) (None = none): what a
        decode graph captures. -> logits [bucket, V] float32."""
        tile, rank_bound = variant or (None, None)
        d, width = self._dev, self.max_blocks_per_seq
        segs = table_width(bucket, tile) if tile is not None else bucket     # (no LoRA: unused)
        attn = AttentionMeta(num_prefill_tokens=0, num_decodes=bucket, slot_mapping=d["slot_mapping"][:bucket],
                             cu_seqlens=d["cu_seqlens"][:1],
                             block_tables=d["block_tables"][: bucket * width].view(bucket, width),
                             context_lens=d["context_lens"][:bucket])
        lora = LoraBatchMeta(has_lora=variant is not None, seg_indptr=d["seg_indptr"][: segs + 1],
                             seg_slots=d["seg_slots"][:segs], slot_ranks=self.slot_pool.slot_ranks,
                             slot_scales=self.slot_pool.slot_scales, block_t=tile, rank_bound=rank_bound,
                             side_stream=self._lora_stream)
        return self.model(d["input_ids"][:bucket], d["positions"][:bucket], self.kv_caches, attn, lora,
                          d["logits_indices"][:bucket])

    def attach_prompt_graphs(self, graphs: PromptGraphs) -> None:
        """Run steps that are not decode-graph steps through `graphs` (captured after this call),
        with the static buffers its pieces pass each other."""
        self._pieces = PieceBuffers.allocate(self.model.spec, max(graphs.buckets), self.device, self.dtype)
        self.prompt_graphs = graphs

    def _prompt_graph_forward(self, batch: StepBatch) -> torch.Tensor:
        """The step's pieces replayed over the static buffers (prepare padded them to the bucket),
        each layer's attention run eagerly between them over the step's real tokens."""
        bufs, n = self._pieces.prefix(batch.prompt_bucket), batch.num_tokens
        layers = self.model.layers

        def attend(i: int) -> None:
            layers[i].self_attn.attn.attend(bufs.q[:n], bufs.k[:n], bufs.v[:n], *self.kv_caches[i], batch.attn,
                                            out=bufs.attn_out[:n])
        self.prompt_graphs.run(batch.prompt_bucket, batch.lora.has_lora, attend)
        return self.model.logits(bufs.h, bufs.pending, batch.logits_indices)

    def static_prompt_piece(self, bucket: int, has_lora: bool, i: int) -> None:
        """Piece i of a prompt step over the static buffers' first `bucket` rows, as prepare fills
        them for a padded prompt step: what a prompt graph captures."""
        d, g = self._dev, self.max_num_seqs
        lora = LoraBatchMeta(has_lora=has_lora, seg_indptr=d["seg_indptr"][: g + 1], seg_slots=d["seg_slots"][:g],
                             slot_ranks=self.slot_pool.slot_ranks, slot_scales=self.slot_pool.slot_scales,
                             block_t=PROMPT_TILE, shrink_block_t=PROMPT_SHRINK_TILE, block_g=self.eager_block_g,
                             rank_bound=self.slot_pool.max_rank, side_stream=self._lora_stream)
        self.model.run_piece(i, self._pieces.prefix(bucket), d["input_ids"][:bucket], d["positions"][:bucket],
                             self.kv_caches, d["slot_mapping"][:bucket], lora)

    @torch.inference_mode()
    def _capture_prompt_graphs(self) -> None:
        # capture-time inputs: all rows padding (no KV write, base model)
        top = max(self.prompt_graphs.buckets)
        self._dev["slot_mapping"][:top].fill_(-1)
        self._dev["seg_slots"].fill_(-1)
        self._dev["seg_indptr"].zero_()
        self.prompt_graphs.capture(self.static_prompt_piece)

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        # capture-time inputs: all rows padding (no KV write, no context, base model)
        top = max(self.graphs.buckets)
        self._dev["slot_mapping"][:top].fill_(-1)
        self._dev["context_lens"][:top].zero_()
        self._dev["seg_slots"][:top].fill_(-1)
        self._dev["seg_indptr"][: top + 1].copy_(torch.arange(top + 1, dtype=torch.int32))
        self._dev["logits_indices"][:top].copy_(torch.arange(top))
        self.graphs.capture(self.static_decode_forward)
