"""Classical peers: other registration tools, run on the same pairs in the same benchmark run so that every table
has their Dice and time beside ours. They are not our methods (not in the registry, never offered to users).

What each peer is given, and why that is a fair footing:

- Every tool starts from the same raw pair (the images as stored, each in its own scanner frame, no
  pre-alignment, no intensity normalisation) and does what its users get from its documented default call,
  including its own initial alignment. Our methods get the engine's affine initial alignment (the ``align`` stage
  of ``deepdiffreg register``); ANTs SyN gets its own affine stage (part of ``type_of_transform="SyN"``). Both
  are inside the timed process, so each wall time is "raw pair in → transform and warped image out".
- Same threads: a peer gets the thread count our register children get (``--threads``, else the engine's
  default, cores − 1), through ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` set before the tool is imported.
- Same metrics: a peer writes its fixed → moving transform as an ITK file; Dice, TRE, folds (det ∇T on the fixed
  grid, ``metrics.jacobian_det_lps``) and the displacement error are computed from it by the benchmark with the
  engine's metrics code, outside the timed process. "init. align" of a peer is its own affine stage alone.
- Timed as a whole, like our methods: the child process from start to exit (interpreter start, importing the
  tool, reading the images, the registration, writing the transform and the warped image).
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInput

HERE = Path(__file__).parent
REFERENCE = "ants-syn"         # every row's wall time is also given as a ratio to this peer's on the same pair
SEED = 2026                    # the peers' random sampling is seeded, so a rerun gives the same numbers


@dataclass(frozen=True)
class Peer:
    name: str
    title: str                 # what it is, for the tables' notes
    call: str                  # exactly how it is called (docs, JSON)
    module: str                # the Python module it needs (None: nothing)
    install: str               # how to get it
    script: str                # the child script next to this file

    def missing(self) -> str | None:
        """None when the peer can run here; otherwise why not (one line)."""
        if self.module and importlib.util.find_spec(self.module) is None:
            return f"{self.name} needs the Python module {self.module!r} ({self.install})"
        return None

    def command(self, pair: dict[str, Any], out_dir: Path, threads: int) -> list[str]:
        return [sys.executable, str(HERE / self.script), "--fixed", pair["fixed"], "--moving", pair["moving"],
                "--out", str(out_dir), "--threads", str(threads), "--seed", str(SEED)]

    @staticmethod
    def initial_part(transform) -> dict[str, Any]:
        """{"initial_alignment": the transform's linear components alone} when it is a composite with some (the
        peer's own affine stage), else {}."""
        import SimpleITK as sitk
        if transform.GetName() != "CompositeTransform":
            return {}
        comp = sitk.CompositeTransform(transform)
        parts = [comp.GetNthTransform(i) for i in range(comp.GetNumberOfTransforms())]
        linear = [t for t in parts if t.GetName() not in ("DisplacementFieldTransform", "BSplineTransform")]
        if not linear or len(linear) == len(parts):
            return {}
        out = sitk.CompositeTransform(3)
        for t in linear:
            out.AddTransform(t)
        return {"initial_alignment": out}


PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("ants-syn", "ANTs SyN (antspyx)",
         "ants.registration(fixed, moving, type_of_transform='SyN') — antspyx defaults: Mattes MI affine "
         "(4 levels) then SyN (Mattes MI, 40×20×0 iterations), center-of-mass initialisation",
         "ants", "pip install 'deepdiffreg[bench]', i.e. antspyx", "peer_ants.py"),
)}


def select(names: list[str] | None, quick: bool) -> tuple[list[Peer], list[str]]:
    """(peers to run, notes). Without ``--peers``: every peer that is installed (none with --quick), the others
    named in a note; ``--peers none``: none; named peers must be installed (one-line BadInput otherwise)."""
    if names is None:
        if quick:
            return [], []
        peers = [p for p in PEERS.values() if p.missing() is None]
        notes = [f"{p.name} not run: {p.missing()}" for p in PEERS.values() if p.missing() is not None]
        return peers, notes
    if names == ["none"]:
        return [], []
    out = []
    for n in names:
        if n not in PEERS:
            raise BadInput(f"unknown peer {n!r}; available: {', '.join(PEERS)} (or none)")
        why = PEERS[n].missing()
        if why:
            raise BadInput(why)
        out.append(PEERS[n])
    return out, []
