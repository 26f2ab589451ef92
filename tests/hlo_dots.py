"""Parse compiled HLO text into the dots it runs, with their operands' types and origins."""

import dataclasses
import re

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\](?:\{([\d,]*)[^}]*\})?\s+"
                    r"([\w\-]+)\((.*?)\)(.*)$")


@dataclasses.dataclass
class Instr:
    name: str
    dtype: str
    shape: tuple
    layout: tuple | None
    opcode: str
    operands: list
    attrs: str


@dataclasses.dataclass
class Dot:
    instr: Instr
    lhs: Instr
    rhs: Instr

    @property
    def lhs_contracting(self):
        return tuple(int(x) for x in re.search(r"lhs_contracting_dims=\{([\d,]*)\}", self.instr.attrs).group(1).split(",") if x)

    @property
    def rhs_contracting(self):
        return tuple(int(x) for x in re.search(r"rhs_contracting_dims=\{([\d,]*)\}", self.instr.attrs).group(1).split(",") if x)


def parse(hlo: str) -> dict:
    instrs = {}
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, dtype, shape, layout, opcode, operands, attrs = m.groups()
        shape = tuple(int(s) for s in shape.split(",") if s)
        layout = tuple(int(s) for s in layout.split(",") if s) if layout else None
        ops = re.findall(r"%([\w.\-]+)", operands)
        instrs[name] = Instr(name, dtype, shape, layout, opcode, ops, attrs)
    return instrs


def dots(hlo: str) -> list:
    instrs = parse(hlo)
    out = []
    for ins in instrs.values():
        if ins.opcode == "dot" and len(ins.operands) == 2:
            out.append(Dot(ins, instrs[ins.operands[0]], instrs[ins.operands[1]]))
    return out


def slow_reasons(d: Dot, dtype: str) -> list:
    """Why XLA's fast CPU matmul path would refuse this dot (empty list: fast form)."""
    reasons = []
    for side, op in (("lhs", d.lhs), ("rhs", d.rhs)):
        if op.dtype != dtype:
            reasons.append(f"{side} is {op.dtype}")
        if op.opcode == "transpose":
            reasons.append(f"{side} comes from a transpose")
        if op.layout is not None and list(op.layout) != sorted(op.layout, reverse=True):
            reasons.append(f"{side} has non-row-major layout {op.layout}")
    if d.lhs_contracting != (len(d.lhs.shape) - 1,):
        reasons.append(f"lhs contracts dim {d.lhs_contracting} of rank {len(d.lhs.shape)}")
    return reasons
