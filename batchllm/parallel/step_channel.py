"""How tensor-parallel rank 0 hands each step to the other ranks: one int64 array per step.

Rank 0 schedules; every rank runs the same `ModelRunner.submit` on the same `ScheduledBatch`
(block-table diffs, copies, attention plan, CUDA graphs), so the followers need exactly the batch.
It is packed into one int64 array (no pickling: ~1.8 ms a step on gloo, as much as a decode step)
and sent with one gloo broadcast of a fixed-size buffer over the host group; a batch larger than the
buffer sends its remainder in a second broadcast. Followers get `sampling` only as "samples or
not" (`FOLLOWER_SAMPLES`): rank 0 samples and broadcasts the tokens on the device. Prompt-logprob
rows travel as (row_start, number of rows) only: a follower computes their logits (the LM head
all-gathers) but never reads them, so it gets no targets.

Layout: [kind, total length, num_requests, num_finished, num_copies, string bytes,
         finished ids (string refs), copies (src, dst pairs),
         per request: id ref, n_tokens, tokens, start_position, block_table_start, n_blocks, blocks,
                      samples (0/1), prompt-logprob row_start, n_rows (0: none),
                      n_prefixes, (prefix id ref, length) pairs,
         the strings' UTF-8 bytes, NUL-separated, packed 8 per int64]
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from batchllm.outputs import PromptLogprobsSpec, SamplingSpec, ScheduledBatch, ScheduledRequest

FOLLOWER_SAMPLES = SamplingSpec(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, num_logprobs=None)
"""What a follower sees for a request that samples this step (it never samples itself)."""

_STEP, _STOP = 1, 2
_HEADER = 6

def encode_batch(batch: ScheduledBatch) -> np.ndarray:
    strings: dict[str, int] = {}

    def ref(s: str) -> int:
        return strings.setdefault(s, len(strings))

    ints: list[int] = [_STEP, 0, len(batch.requests), len(batch.finished_request_ids), len(batch.block_copies), 0]
    ints.extend(ref(r) for r in batch.finished_request_ids)
    for src, dst in batch.block_copies:
        ints += (src, dst)
    for r in batch.requests:
        ints += (ref(r.request_id), len(r.token_ids))
        ints.extend(r.token_ids)
        ints += (r.start_position, r.block_table_start, len(r.block_ids))
        ints.extend(r.block_ids)
        plp = r.prompt_logprobs
        ints += (r.sampling is not None, 0 if plp is None else plp.row_start, 0 if plp is None else plp.num_rows,
                 len(r.shared_prefixes))
        for prefix_id, length in r.shared_prefixes:
            ints += (ref(prefix_id), length)
    raw = "\0".join(strings).encode()
    ints[5] = len(raw)
    packed = np.frombuffer(raw + b"\0" * (-len(raw) % 8), dtype=np.int64)
    out = np.concatenate([np.asarray(ints, dtype=np.int64), packed])
    out[1] = len(out)
    return out


def decode_batch(data: np.ndarray) -> ScheduledBatch:
    values = data.tolist()
    _, total, num_requests, num_finished, num_copies, num_bytes = values[:_HEADER]
    raw = data[total - (-(-num_bytes // 8)):total].tobytes()[:num_bytes].decode()
    strings = raw.split("\0")
    pos = _HEADER
    finished = [strings[i] for i in values[pos:pos + num_finished]]
    pos += num_finished
    copies = [(values[pos + 2 * i], values[pos + 2 * i + 1]) for i in range(num_copies)]
    pos += 2 * num_copies
    requests = []
    for _ in range(num_requests):
        rid, n = values[pos], values[pos + 1]
        tokens = values[pos + 2:pos + 2 + n]
        pos += 2 + n
        start, table_start, num_blocks = values[pos:pos + 3]
        blocks = values[pos + 3:pos + 3 + num_blocks]
        pos += 3 + num_blocks
        samples, row_start, num_rows, num_prefixes = values[pos:pos + 4]
        pos += 4
        prefixes = tuple((strings[values[pos + 2 * i]], values[pos + 2 * i + 1]) for i in range(num_prefixes))
        pos += 2 * num_prefixes
        plp = PromptLogprobsSpec(0, row_start, [()] * num_rows) if num_rows else None
        requests.append(ScheduledRequest(strings[rid], tokens, start, blocks, table_start,
                                         FOLLOWER_SAMPLES if samples else None, prefixes, plp))
    return ScheduledBatch(requests, finished, copies)


class StepChannel:
    """Rank 0 `send`s each step (or `stop`); the other ranks `recv` them in order. One broadcast of
    `buffer_ints` int64 per step, plus one for the remainder of a larger step."""

    def __init__(self, group, buffer_ints: int = 1 << 13) -> None:
        self.group = group
        self.buffer = torch.zeros(buffer_ints, dtype=torch.int64)

    def send(self, batch: ScheduledBatch) -> None:
        self._send(encode_batch(batch))

    def stop(self) -> None:
        self._send(np.asarray([_STOP, 2], dtype=np.int64))

    def recv(self) -> ScheduledBatch | None:
        """The next step, or None once rank 0 stopped."""
        dist.broadcast(self.buffer, src=0, group=self.group)
        head = self.buffer.numpy()
        kind, total = int(head[0]), int(head[1])
        if kind == _STOP:
            return None
        if total <= len(head):
            return decode_batch(head[:total].copy())
        rest = torch.empty(total - len(head), dtype=torch.int64)
        dist.broadcast(rest, src=0, group=self.group)
        return decode_batch(np.concatenate([head, rest.numpy()]))

    def _send(self, data: np.ndarray) -> None:
        n = len(self.buffer)
        self.buffer[: min(n, len(data))] = torch.from_numpy(data[:n])
        dist.broadcast(self.buffer, src=0, group=self.group)
        if len(data) > n:
            dist.broadcast(torch.from_numpy(np.ascontiguousarray(data[n:])), src=0, group=self.group)
