"""Instructions per loop body of PTX files: `python3 ptx_loops.py a.ptx ...` prints, for each backward
branch (a loop), its label, line range, instruction count and the commonest opcodes."""

import collections
import re
import sys

OPERAND_KINDS = ("ld", "st", "cvt", "cp", "mma", "ldmatrix")


def opcode_family(opcode: str) -> str:
    """The opcode's first part, with the second for memory, conversion and MMA instructions."""
    parts = opcode.split(".")
    return ".".join(parts[:2]) if parts[0] in OPERAND_KINDS and len(parts) > 1 else parts[0]


def loops(path: str) -> None:
    lines = open(path).read().split("\n")
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\$L__\w+):", line.strip()))}
    print(path)
    for i, line in enumerate(lines):
        m = re.search(r"bra(?:\.uni)?\s+(\$L__\w+);", line)
        if not m or m.group(1) not in labels or labels[m.group(1)] >= i:
            continue
        ops = collections.Counter()
        for body_line in lines[labels[m.group(1)]:i + 1]:
            op = re.match(r"^\s+(?:@!?%p\d+\s+)?([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*)", body_line)
            if op:
                ops[opcode_family(op.group(1))] += 1
        count = sum(ops.values())
        if count >= 30:
            print(f"  loop {m.group(1)} lines {labels[m.group(1)]}-{i}: {count} instr;", dict(ops.most_common(14)))


if __name__ == "__main__":
    for ptx in sys.argv[1:]:
        loops(ptx)
