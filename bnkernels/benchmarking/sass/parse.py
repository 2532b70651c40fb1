"""Readers of what Triton and ptxas produce for one kernel: the cubin (an ELF file: registers,
frame size, static shared memory, and the SASS instructions decoded in place), ptxas's ``-v``
log (spills), a SASS listing (``cuobjdump -sass``, to check the decoder), the PTX (global
accesses by source location) and the Triton IR (which kernel argument each memory operation
addresses, and the rank of its pointer block). Pure functions of text and bytes."""

from __future__ import annotations

import re
import struct

# ----------------------------------------------------------------------------- cubin (ELF)

# sm_90 SASS: 128-bit instructions; the low 9 bits of the first 64-bit word are the opcode (bits
# 9-11 the operand form), and memory instructions hold their access size in bits 73-75 (bits
# 9-11 of the second word). Checked against cuobjdump's listing in tests/test_sass.py.
SASS_OPCODES = {0x181: "LDG", 0x186: "STG", 0x183: "LDL", 0x187: "STL", 0x1a3: "ATOMG",
                0x1a8: "ATOMG", 0x18e: "RED"}
SASS_SIZE_BITS = {0: 8, 1: 8, 2: 16, 3: 16, 4: 32, 5: 64, 6: 128, 7: 128}

# EIATTR codes of the .nv.info sections (CUDA's ELF kernel attributes).
EIATTR_REGCOUNT = 0x2F
EIATTR_FRAME_SIZE = 0x11


def elf_sections(blob: bytes) -> dict[str, tuple[int, int, int, int]]:
    """Section name -> (type, offset, size, info) of a 64-bit little-endian ELF file."""
    if blob[:4] != b"\x7fELF" or blob[4] != 2:
        raise ValueError("not a 64-bit ELF file (cubin)")
    shoff, = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", blob, 0x3A)
    raw = [struct.unpack_from("<IIQQQQIIQQ", blob, shoff + i * shentsize) for i in range(shnum)]
    strtab = raw[shstrndx][4]
    out = {}
    for name, typ, _flags, _addr, off, size, _link, info, _align, _entsize in raw:
        end = blob.index(b"\0", strtab + name)
        out[blob[strtab + name:end].decode()] = (typ, off, size, info)
    return out


def _nv_info(blob: bytes, section: tuple) -> list[tuple[int, bytes]]:
    """(attribute, value bytes) of a .nv.info section."""
    _, off, size, _ = section
    out, i = [], off
    while i + 4 <= off + size:
        fmt, attr = blob[i], blob[i + 1]
        if fmt == 4:  # EIFMT_SVAL: a 2-byte length, then the value
            n, = struct.unpack_from("<H", blob, i + 2)
            out.append((attr, blob[i + 4:i + 4 + n]))
            i += 4 + n
        else:  # EIFMT_HVAL / NVAL: the value in the 2 bytes after
            out.append((attr, blob[i + 2:i + 4]))
            i += 4
    return out


def decode_sass(code: bytes) -> dict:
    """Global and local memory instructions of sm_90 machine code, counted by access size in
    bits: ``{"LDG": {bits: n}, "STG": ..., "LDL": ..., "STL": ..., "atomics": n,
    "instructions": n}`` (static counts)."""
    out = {"LDG": {}, "STG": {}, "LDL": {}, "STL": {}, "atomics": 0,
           "instructions": len(code) // 16}
    for i in range(0, len(code) - 15, 16):
        w0, w1 = struct.unpack_from("<QQ", code, i)
        name = SASS_OPCODES.get(w0 & 0x1FF)
        if name is None:
            continue
        if name in ("ATOMG", "RED"):
            out["atomics"] += 1
            continue
        bits = SASS_SIZE_BITS[(w1 >> 9) & 7]
        out[name][bits] = out[name].get(bits, 0) + 1
    return out


def read_cubin(blob: bytes) -> dict:
    """The one kernel of a Triton cubin: name, registers per thread, frame (local memory) bytes
    per thread, static shared memory, and its decoded memory instructions."""
    secs = elf_sections(blob)
    texts = [n for n in secs if n.startswith(".text.")]
    if len(texts) != 1:
        raise ValueError(f"expected one kernel in the cubin, found {texts}")
    name = texts[0][len(".text."):]
    _, off, size, _ = secs[texts[0]]
    regs = frame = None
    for attr, val in _nv_info(blob, secs[".nv.info"]) if ".nv.info" in secs else []:
        if attr == EIATTR_REGCOUNT and len(val) >= 8:
            regs = struct.unpack_from("<I", val, 4)[0]
        elif attr == EIATTR_FRAME_SIZE and len(val) >= 8:
            frame = struct.unpack_from("<I", val, 4)[0]
    shared = secs.get(f".nv.shared.{name}", (0, 0, 0, 0))[2]
    return {"name": name, "regs": regs, "frame": frame, "static_smem": shared,
            "sass": decode_sass(blob[off:off + size])}


# ----------------------------------------------------------------------------- ptxas -v

_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                          r"loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(text: str) -> dict | None:
    """Registers, stack frame, spill stores/loads (bytes) and static shared memory of the one
    function in a ``ptxas -v`` log; None if there is none."""
    used, frame = _PTXAS_USED.search(text), _PTXAS_FRAME.search(text)
    if not used or not frame:
        return None
    smem = _PTXAS_SMEM.search(text)
    return {"regs": int(used.group(1)), "stack_frame": int(frame.group(1)),
            "spill_stores": int(frame.group(2)), "spill_loads": int(frame.group(3)),
            "smem": int(smem.group(1)) if smem else 0}


# ----------------------------------------------------------------------------- SASS listing

_WIDTH_TOKENS = {"128": 128, "64": 64, "32": 32, "U16": 16, "S16": 16, "16": 16, "U8": 8,
                 "S8": 8, "8": 8}
_SASS_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def sass_access_width(opcode: str) -> int:
    """Bits moved per thread by a SASS memory instruction: ``LDG.E.128`` -> 128, ``LDG.E``
    -> 32, ``STG.E.U16`` -> 16, ``LDL.64`` -> 64."""
    for token in opcode.split(".")[1:]:
        if token in _WIDTH_TOKENS:
            return _WIDTH_TOKENS[token]
    return 32


def parse_sass(text: str) -> dict:
    """A SASS listing (``cuobjdump -sass``) counted as :func:`decode_sass` counts machine
    code."""
    out = {"LDG": {}, "STG": {}, "LDL": {}, "STL": {}, "atomics": 0, "instructions": 0}
    for m in _SASS_INSN.finditer(text):
        opcode = m.group(1)
        out["instructions"] += 1
        base = opcode.split(".")[0]
        if base in ("LDG", "STG", "LDL", "STL"):
            w = sass_access_width(opcode)
            out[base][w] = out[base].get(w, 0) + 1
        elif base in ("ATOMG", "RED"):
            out["atomics"] += 1
    return out


# ----------------------------------------------------------------------------- PTX

_PTX_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+(\d+)(?:,.*?inlined_at\s+(\d+)\s+(\d+)\s+"
                      r"(\d+))?")
_PTX_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')
_PTX_MEM = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st|atom|red)\.global((?:\.\w+)*)\s")
_PTX_BITS = {"b8": 8, "u8": 8, "s8": 8, "b16": 16, "u16": 16, "s16": 16, "f16": 16,
             "bf16": 16, "b32": 32, "u32": 32, "s32": 32, "f32": 32, "b64": 64, "u64": 64,
             "s64": 64, "f64": 64, "b128": 128}


def parse_ptx(text: str) -> list[dict]:
    """Global memory instructions of a PTX listing: kind (load, store, atomic), width in bits
    and the source location they come from (innermost (file, line, column) and the one it is
    inlined at, from the ``.loc`` before the instruction)."""
    files = {m.group(1): m.group(2) for m in map(_PTX_FILE.match, text.splitlines()) if m}
    loops = ptx_loops(text)
    out, loc, in_asm = [], None, False
    for index, line in enumerate(text.splitlines()):
        if "begin inline asm" in line or "end inline asm" in line:
            # Inside an inline-asm block LLVM numbers the block's own lines from the statement's
            # .loc on (a 4-element load's asm reads as 4 source lines): keep the .loc before it.
            in_asm = "begin" in line
            continue
        m = _PTX_LOC.match(line)
        if m:
            if not in_asm:
                f, ln, col, f2, ln2, col2 = m.groups()
                inner = (files.get(f, f), int(ln), int(col))
                outer = (files.get(f2, f2), int(ln2), int(col2)) if f2 else None
                loc = (inner, outer)
            continue
        m = _PTX_MEM.match(line)
        if not m:
            continue
        op, mods = m.group(1), m.group(2).split(".")[1:]
        vec = next((int(t[1:]) for t in mods if t in ("v2", "v4", "v8")), 1)
        bits = next((_PTX_BITS[t] for t in reversed(mods) if t in _PTX_BITS), 32)
        kind = {"ld": "load", "st": "store"}.get(op, "atomic")
        loop = min((lp for lp in loops if lp[0] < index < lp[1]),
                   key=lambda lp: lp[1] - lp[0], default=None)
        out.append({"kind": kind, "bits": vec * bits, "loc": loc, "loop": loop})
    return out


_PTX_LABEL = re.compile(r"^\s*(\$L__\w+):")
_PTX_BRA = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")


def ptx_loops(text: str) -> list[tuple[int, int]]:
    """The loops of a PTX listing as (line of the label, line of the backward branch to it)."""
    lines = text.splitlines()
    labels = {m.group(1): i for i, m in enumerate(map(_PTX_LABEL.match, lines)) if m}
    out = []
    for i, line in enumerate(lines):
        m = _PTX_BRA.search(line)
        if m and labels.get(m.group(1), i) < i:
            out.append((labels[m.group(1)], i))
    return out


# ----------------------------------------------------------------------------- Triton IR

_TTIR_LOCDEF = re.compile(r"^(#loc\d*)\s*=\s*loc\((.*)\)\s*$")
_TTIR_ARG = re.compile(r"%([\w$.-]+):\s*(!tt\.ptr<[^>]+>|[\w]+)(\s*\{[^}]*\})?")
_TTIR_DEF = re.compile(r"^\s*(%[\w$.#-]+(?:\s*,\s*%[\w$.#-]+)*)(?::\d+)?\s*=\s*(.*)$")
_TTIR_VAL = re.compile(r"%([\w$.-]+)")
_TTIR_MEMOP = re.compile(r"\btt\.(load|store|atomic_rmw|atomic_cas)\b")


def _resolve_loc(ref: str, table: dict, depth: int = 0):
    """(innermost (file, line, col), the location it is inlined at or None)."""
    text = table.get(ref, ref) if ref.startswith("#loc") else ref
    if depth > 50:
        return None
    m = re.match(r'^"([^"]+)":(\d+):(\d+)', text)
    if m:
        return ((m.group(1), int(m.group(2)), int(m.group(3))), None)
    m = re.match(r"^callsite\((#loc\d*|.+?) at (#loc\d*|.+)\)$", text)
    if m:
        inner = _resolve_loc(m.group(1), table, depth + 1)
        outer = _resolve_loc(m.group(2), table, depth + 1)
        if inner is None:
            return None
        return (inner[0], outer[0] if outer else None)
    m = re.match(r'^"[^"]*"\((#loc\d*)\)$', text)  # a named location
    if m:
        return _resolve_loc(m.group(1), table, depth + 1)
    m = re.match(r"^(#loc\d*)$", text)
    if m and m.group(1) != ref:
        return _resolve_loc(m.group(1), table, depth + 1)
    return None


def parse_ttir(text: str, arg_names: list[str]) -> dict:
    """The kernel's arguments as the IR has them (named by ``arg_names``: the non-constexpr
    parameters, in order) with their types and ``tt.divisibility``, and every memory operation:
    kind, the pointer arguments its address derives from (SSA data flow, through loops and
    branches), the rank of its pointer block (0: a scalar) and its source location."""
    lines = text.splitlines()
    locs = {}
    for line in lines:
        m = _TTIR_LOCDEF.match(line)
        if m:
            locs[m.group(1)] = m.group(2)
    start = next((i for i, ln in enumerate(lines) if "tt.func" in ln), None)
    if start is None:
        return {"args": [], "ops": []}
    func = lines[start]
    head = func[func.find("(") + 1:]
    args = []
    for i, m in enumerate(_TTIR_ARG.finditer(head)):
        name = arg_names[i] if i < len(arg_names) else m.group(1)
        args.append({"ssa": m.group(1), "name": name, "type": m.group(2),
                     "div16": "tt.divisibility = 16" in (m.group(3) or "")})
    deps: dict[str, set] = {a["ssa"]: {a["name"]} for a in args
                            if a["type"].startswith("!tt.ptr")}
    ops: list[dict] = []
    # One sweep in text order: a definition replaces what a name meant before (MLIR reuses
    # names in sibling regions); loop-carried values start from their initial values (a loop
    # step derives from them); region results collect what their regions yield.
    stack: list[list[str]] = []  # the results of the region-holding ops we are inside
    loops: list = []  # per open region: the line of the innermost scf.for holding it, or None
    for index, line in enumerate(lines[start + 1:]):
        code = line.split(" loc(")[0]
        stripped = code.strip()
        if stripped.startswith("}"):
            if stack:
                top = stack.pop()
                loop = loops.pop()
                if stripped.endswith("{"):  # "} else {": the same op's next region
                    stack.append(top)
                    loops.append(loop)
            continue
        m = _TTIR_DEF.match(code)
        results, rhs = [], stripped
        if m:
            results = [r.strip().lstrip("%").split("#")[0].split(":")[0]
                       for r in m.group(1).split(",")]
            rhs = m.group(2)
        src: set = set()
        for v in _TTIR_VAL.findall(rhs):
            src |= deps.get(v.split("#")[0], set())
        for r in results:
            deps[r] = set(src)
        it = re.search(r"iter_args\((.*?)\)\s*->", rhs)
        if it:
            for pair in it.group(1).split(","):
                if "=" in pair:
                    lhs, r = (p.strip().lstrip("%") for p in pair.split("=", 1))
                    deps[lhs] = set(deps.get(r.split("#")[0], set()))
        if stripped.startswith("scf.yield") and stack:
            for r in stack[-1]:
                deps.setdefault(r, set()).update(src)
        if stripped.endswith("{"):
            stack.append(results)
            loops.append(index if "scf.for" in rhs else (loops[-1] if loops else None))
        mem = _TTIR_MEMOP.search(rhs)
        if not mem:
            continue
        operands = _TTIR_VAL.findall(rhs[mem.end():].split(" : ")[0])
        ptr = operands[0].split("#")[0] if operands else ""
        types = rhs.rsplit(" : ", 1)[-1] if " : " in rhs else ""
        tm = re.match(r"\s*\(?\s*tensor<([\dx]+)x!tt\.ptr", types)
        rank = len(tm.group(1).split("x")) if tm else 0
        lm = re.search(r"loc\((#loc\d*)\)\s*$", line)
        ops.append({"kind": {"load": "load", "store": "store"}.get(mem.group(1), "atomic"),
                    "params": sorted(deps.get(ptr, set())), "rank": rank,
                    "loc": _resolve_loc(lm.group(1), locs) if lm else None,
                    "loop": loops[-1] if loops else None})
    return {"args": args, "ops": ops}


def access_summary(ptx: list[dict], ttir: dict) -> dict:
    """Per kernel argument: the PTX access widths of its loads and stores, split into tile
    accesses (a 2-D or larger block of pointers: the big tensors' tiles) and the rest, and how
    many tile loads/stores of the IR reached the PTX. PTX accesses are matched to IR operations
    by source location (innermost and inlined-at, else innermost alone)."""
    by_loc: dict = {}
    by_inner: dict = {}
    for op in ttir["ops"]:
        if op["loc"] is not None:
            by_loc.setdefault(op["loc"], []).append(op)
            by_inner.setdefault(op["loc"][0], []).append(op)
    params: dict = {}

    def slot(name):
        return params.setdefault(name, {"tile_load_bits": {}, "tile_store_bits": {},
                                        "load_bits": {}, "store_bits": {}, "atomics": 0,
                                        "tile_loads": 0, "tile_stores": 0})

    reached = set()
    unmatched = 0
    tile_bytes: dict = {}  # loop (or None: straight-line code) -> tile bytes loaded a thread
    for acc in ptx:
        loc = acc["loc"]
        cands = [op for op in (by_loc.get(loc) or by_inner.get(loc[0] if loc else None) or [])
                 if op["kind"] == acc["kind"]]
        if not cands:
            unmatched += 1
            continue
        if acc["kind"] == "load" and any(op["rank"] >= 2 for op in cands):
            group = acc.get("loop")
            tile_bytes[group] = tile_bytes.get(group, 0) + acc["bits"] // 8
        for op in cands:
            reached.add(id(op))
            for name in op["params"] or ["?"]:
                s = slot(name)
                if acc["kind"] == "atomic":
                    s["atomics"] += 1
                    continue
                key = ("tile_" if op["rank"] >= 2 else "") + acc["kind"] + "_bits"
                s[key][acc["bits"]] = s[key].get(acc["bits"], 0) + 1
    # Sweeps: tile accesses of a tensor in one loop body split the loop's units between them
    # (a loop taking two units an iteration loads each half of the tensor once): one sweep per
    # loop, and one per tile access outside loops.
    sweeps: dict = {}
    for op in ttir["ops"]:
        if op["rank"] >= 2 and op["kind"] in ("load", "store") and id(op) in reached:
            group = op.get("loop")
            for name in op["params"]:
                sweeps.setdefault((name, op["kind"]), set()).add(
                    ("loop", group) if group is not None else ("op", id(op)))
    for (name, kind), groups in sweeps.items():
        slot(name)["tile_" + kind + "s"] = len(groups)
    for s in params.values():
        for k in ("tile_load_bits", "tile_store_bits", "load_bits", "store_bits"):
            s[k] = {str(b): n for b, n in sorted(s[k].items())}
    # Bytes of tile loads a thread has in flight at once: those of one loop iteration (the
    # loop that loads most; a fused kernel's loops run one after the other), or of the whole
    # kernel where no loop loads tiles (an elementwise pass).
    in_loops = [n for g, n in tile_bytes.items() if g is not None]
    per_thread = max(in_loops) if in_loops else tile_bytes.get(None, 0)
    return {"params": params, "unmatched_ptx_accesses": unmatched,
            "tile_load_bytes_per_thread": per_thread}
