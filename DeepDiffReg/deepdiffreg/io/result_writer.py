"""Writing a registration result directory exactly as the result contract says (README, "Result contract").

``write_result`` writes every file of a result directory (``ResultData``, made by ``compose.compose_result``, plus
report.json). All files are written into a temporary sibling directory that is renamed into place only when
complete, so a failed or cancelled run never leaves a half-written result.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import gzip
import json
import os
import shutil
import signal
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk

from ..errors import BadInput, RegistrationError
from ..frames import Geometry
from ..progress import dumps

FILES = {"transform": "transform.h5", "inverse": "inverse.h5", "affine": "affine.h5", "jacobian": "jacobian.nii.gz", "grid": "grid.vtk",
         "warped": "warped.nii.gz", "warped_seg": "warped_seg.nii.gz", "uncertainty": "uncertainty.nii.gz",
         "report": "report.json"}


def _is_within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (symlinks resolved)."""
    p, f = os.path.realpath(path), os.path.realpath(folder)
    try:
        return os.path.commonpath([p, f]) == f
    except ValueError:  # different drives (Windows)
        return False


def _no_space(exc: BaseException | None, folder: str) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc or "").lower()
    if "no space" in text or "disk full" in text or "quota" in text:
        return True
    if isinstance(exc, (OSError, RuntimeError)):  # ITK/HDF5 say "write failed" without the reason
        try:
            return shutil.disk_usage(folder).free < (1 << 20)
        except OSError:
            return False
    return False


class _Lock:
    """An exclusive, non-blocking lock on ``path`` (a small file, removed on release). POSIX: ``flock`` (released by
    the kernel when the process dies, so a stale file never blocks a later run); elsewhere: O_EXCL + the owner's pid."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> bool:
        try:
            import fcntl
        except ImportError:
            return self._acquire_excl()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            try:  # the file may have been removed by its previous owner between our open and our lock: retry
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self.fd = fd
                return True
            os.close(fd)

    def _acquire_excl(self) -> bool:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    with open(self.path) as fh:
                        pid = int(fh.read().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _pid_alive(pid):
                    return False
                try:
                    os.remove(self.path)   # stale: its owner is gone
                except OSError:
                    return False
                continue
            os.write(fd, str(os.getpid()).encode())
            self.fd = fd
            return True
        return False

    def owner(self) -> str:
        try:
            with open(self.path) as fh:
                return fh.read().strip()
        except OSError:
            return "?"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.remove(self.path)     # removed while still held: a waiting run retries on a fresh file
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


_LIVE: "weakref.WeakSet[AtomicResultDir]" = weakref.WeakSet()
_HELD: "weakref.WeakValueDictionary[str, AtomicResultDir]" = weakref.WeakValueDictionary()  # out_dir → holder


@atexit.register
def _release_all() -> None:  # a run that failed between check() and writing: drop its lock and folders
    for d in list(_LIVE):
        d.release()


class AtomicResultDir:
    """``with AtomicResultDir(out) as tmp:`` write into ``tmp``; on success it becomes ``out``, on error it is removed.

    ``check()`` (called before any work) refuses an unusable ``out``, takes a lock on it (a second run on the same
    ``out`` fails at once) and sweeps what a killed run left (``<out>.partial-*``, ``<out>.old-*``).
    ``overwrite`` only replaces a previous result folder: one with report.json, nothing in it but result files,
    and no input of this run inside it (``inputs``). Nothing else is ever deleted. Parent folders that this run
    created are removed again when it fails.
    """

    def __init__(self, out_dir: str, overwrite: bool = False, inputs: tuple[str | None, ...] | list = ()):
        self.out_dir = os.path.abspath(out_dir)
        self.overwrite = overwrite
        self.inputs = [p for p in inputs if p]
        self.tmp: str | None = None
        self._lock: _Lock | None = None
        self._created: list[str] = []

    # -- checks --------------------------------------------------------------------------------------------------
    def _check_previous_result(self) -> None:
        out = self.out_dir
        for p in self.inputs:
            if _is_within(p, out):
                raise BadInput(f"refusing --overwrite: the output folder {out} holds the input {p}; "
                               "choose another --out")
        report = os.path.join(out, FILES["report"])
        listed: set[str] = set()
        try:
            with open(report) as fh:
                rep = json.load(fh)
            listed = {str(v) for v in (rep.get("files") or {}).values()} if isinstance(rep, dict) else set()
            ok = isinstance(rep, dict) and ("deepdiffreg_version" in rep or "method" in rep)
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise BadInput(f"refusing --overwrite: {out} is not a previous DeepDiffReg result folder (no valid "
                           "report.json); --overwrite only replaces a result folder — choose another --out")
        allowed = set(FILES.values()) | listed
        others = sorted(n for n in os.listdir(out) if n not in allowed)
        if others:
            raise BadInput(f"refusing --overwrite: {out} holds files that are not part of a result "
                           f"({', '.join(others[:3])}{' ...' if len(others) > 3 else ''}); move them away or choose "
                           "another --out")

    def check(self) -> None:
        out = self.out_dir
        if os.path.lexists(out) and not os.path.isdir(out):
            raise BadInput(f"output path exists and is not a directory: {out}")
        if os.path.isdir(out) and os.listdir(out):
            if not self.overwrite:
                raise BadInput(f"output directory is not empty: {out} (use --overwrite to replace it)")
            self._check_previous_result()
        parent = os.path.dirname(out) or "."
        existing = parent
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise BadInput(f"cannot create output folder {parent}: {existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise BadInput(f"cannot write the output: folder {existing} is not writable")
        if os.path.isdir(out) and not os.access(out, os.W_OK | os.X_OK):
            raise BadInput(f"cannot write the output: folder {out} is read-only")
        if self._lock is not None:
            return                                    # checked and locked already
        missing = []
        d = parent
        while not os.path.isdir(d):
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                continue
            except OSError as e:
                self.release()
                raise BadInput(f"cannot create output folder {d}: {e.strerror}") from None
            self._created.append(d)
        _LIVE.add(self)
        prev = _HELD.get(out)
        if prev is not None and prev is not self and prev.tmp is None:
            prev.release()   # an earlier call in this process that failed before writing (library use, tests)
        lock = _Lock(os.path.join(parent, "." + os.path.basename(out) + ".deepdiffreg-lock"))
        try:
            got = lock.acquire()
        except OSError as e:
            self.release()
            raise BadInput(f"cannot write the output: {parent}: {e.strerror}") from None
        if not got:
            owner = lock.owner()
            self.release()
            raise BadInput(f"another deepdiffreg run (pid {owner}) is writing {out}; wait for it or choose another --out")
        self._lock = lock
        _HELD[out] = self
        self._sweep()

    def _sweep(self) -> None:
        """Remove what killed runs on this ``out`` left (we hold its lock, so none of them is still writing)."""
        parent, base = os.path.split(self.out_dir)
        for name in os.listdir(parent):
            if name.startswith(base + ".partial-") or name.startswith(base + ".old-"):
                path = os.path.join(parent, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)

    def release(self) -> None:
        """Drop the lock and remove the parent folders this run created (when they are still empty)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        for d in reversed(self._created):
            try:
                os.rmdir(d)
            except OSError:
                break
        self._created = []
        _LIVE.discard(self)
        if _HELD.get(self.out_dir) is self:
            del _HELD[self.out_dir]

    def __del__(self):  # a run that failed between check() and writing, once nothing refers to it any more
        try:
            self.release()
        except Exception:  # noqa: BLE001 (interpreter teardown)
            pass

    # -- writing ---------------------------------------------------------------------------------------------------
    def __enter__(self) -> str:
        self.check()
        parent = os.path.dirname(self.out_dir)
        try:
            self.tmp = tempfile.mkdtemp(prefix=os.path.basename(self.out_dir) + ".partial-", dir=parent)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o777 & ~umask)   # mkdtemp makes it 0700; the result folder gets the usual mode
        except OSError as e:
            self.release()
            raise BadInput(f"cannot write the output in {parent}: {e.strerror}") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            space = _no_space(exc, os.path.dirname(self.out_dir))   # before the partial folder frees its space
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.release()
            if space and not isinstance(exc, RegistrationError):
                raise BadInput(f"no space left on the device while writing the result to {self.out_dir} "
                               "(nothing was written)") from None
            if isinstance(exc, PermissionError):
                raise BadInput(f"cannot write the result to {self.out_dir}: permission denied") from None
            return False
        try:
            if os.path.isdir(self.out_dir) and os.listdir(self.out_dir) and not self.overwrite:
                raise BadInput(f"output directory {self.out_dir} was filled by something else during the run; "
                               "nothing was replaced (use --overwrite or another --out)")
            # the two renames run with SIGTERM/SIGINT held back, so a cancel cannot leave no <out> between them
            self._renames()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.release()
            raise
        self.release()
        return False

    def _renames(self) -> None:
        """Old result aside, new one in, old one removed — with SIGTERM/SIGINT deferred until both renames are done.
        (A signal mask would not do: the kernel hands a process signal to any thread that does not block it, e.g. an
        OpenMP worker, and Python then runs the handler in the main thread between any two bytecodes.) A deferred
        signal is delivered to the previous handler afterwards."""
        sigs = (signal.SIGTERM, signal.SIGINT)
        pending: list[int] = []
        main = threading.current_thread() is threading.main_thread()
        previous = {}
        if main:
            for s in sigs:
                previous[s] = signal.getsignal(s)
                signal.signal(s, lambda signum, frame: pending.append(signum))
        try:
            old = None
            if os.path.isdir(self.out_dir):
                old = self.out_dir + ".old-" + os.path.basename(self.tmp).rsplit("-", 1)[-1]
                os.replace(self.out_dir, old)
            try:
                os.replace(self.tmp, self.out_dir)
            except OSError:
                if old:
                    os.replace(old, self.out_dir)   # put the previous result back
                raise
            if old:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        if pending:
            h = previous.get(pending[0])
            if callable(h):
                h(pending[0], None)
            elif h == signal.SIG_DFL:
                os.kill(os.getpid(), pending[0])


def write_displacement_transform(disp_image: sitk.Image, path: str) -> None:
    """Write a float64 LPS displacement image as an ITK DisplacementFieldTransform (.h5).

    Never NIfTI intent 1006 (ITK and Slicer would read the LPS vectors as RAS)."""
    field = disp_image if disp_image.GetPixelID() == sitk.sitkVectorFloat64 else sitk.Cast(disp_image,
                                                                                           sitk.sitkVectorFloat64)
    # the transform takes its image's buffer: hand it a copy so the caller's image stays intact
    write_transform(sitk.DisplacementFieldTransform(sitk.Image(field)), path)


def write_transform(transform: sitk.Transform, path: str) -> None:
    """Write a transform that exists already (the pipeline's T and T⁻¹: flat CompositeTransforms of an affine and a
    float64 LPS displacement field) as it is, without copying a 1 mm brain's ~165 MB field.

    An .h5 holds one flat composite ("Composite Transform can only be 1st transform in a file"): a composite nested
    in another is refused here with a clear message rather than deep inside ITK."""
    # ITK itself refuses a nested composite when writing; asking each part for its name first would copy every
    # displacement field (GetNthTransform returns a copy: ~1 s for the two fields of a 1 mm brain)
    try:
        sitk.WriteTransform(transform, path)
    except RuntimeError as e:
        if "Composite Transform can only be 1st transform" in str(e):
            raise ValueError("write_transform(): nested CompositeTransform; FlattenTransform() it first") from None
        raise


def write_scalar(array_kji: np.ndarray, geom: Geometry, path: str, pixel=np.float32, deflate: bool = True) -> None:
    """(K, J, I) array on ``geom`` → NIfTI at ``path`` (see ``write_image`` for ``deflate``)."""
    img = geom.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array_kji, dtype=pixel)))
    write_image(img, path, deflate)


def write_image(image: sitk.Image, path: str, deflate: bool = True) -> None:
    """Write ``image`` to a .nii.gz path; ``deflate=False`` writes a gzip stream of stored (uncompressed) blocks.

    Float maps of a registration (Jacobian determinant, uncertainty) are dense float32 noise to zlib: deflating a
    1 mm brain's map costs ~0.7 s for a 16 % smaller file (27.5 → 23.1 MB). Stored blocks keep the .nii.gz name
    and format every reader expects (ITK, Slicer, nibabel) at the cost of the larger file.
    """
    if deflate or not path.endswith(".nii.gz"):
        sitk.WriteImage(image, path, useCompression=deflate)
        return
    header = _nifti_header(image, path[:-3])
    if header is None:                                  # not a plain 3-D NIfTI-1 case: ITK's file, wrapped
        plain = path[:-3]                               # write .nii beside it, wrap it as gzip level 0, remove it
        sitk.WriteImage(image, plain, useCompression=False)
        try:
            with open(plain, "rb") as src, gzip.open(path, "wb", compresslevel=0) as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        finally:
            os.remove(plain)
        return
    _write_stored_gzip(path, header, np.ascontiguousarray(sitk.GetArrayViewFromImage(image)))


_NIFTI1_HEADER = 352            # bytes before the voxels in a single-file NIfTI-1 without extensions


def _nifti_header(image: sitk.Image, scratch: str) -> bytes | None:
    """ITK's NIfTI-1 header for ``image`` without writing its voxels: ITK writes a 1×1×1 image of the same pixel
    type, origin, spacing and direction to ``scratch`` (removed again), and its dim[1..3] are set to the image's size.
    Only those three fields depend on the size (checked: a 160×224×192 image's header and its 1×1×1 twin's differ
    there only). None for what this does not cover (not 3-D, vector pixels, a side over 32767 voxels)."""
    size = image.GetSize()
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1 or max(size) > 32767:
        return None
    tiny = sitk.Image([1, 1, 1], image.GetPixelID())
    tiny.SetOrigin(image.GetOrigin())
    tiny.SetSpacing(image.GetSpacing())
    tiny.SetDirection(image.GetDirection())
    sitk.WriteImage(tiny, scratch, useCompression=False)
    try:
        with open(scratch, "rb") as f:
            raw = f.read()
    finally:
        os.remove(scratch)
    item = np.dtype(sitk.GetArrayViewFromImage(tiny).dtype).itemsize
    vox_offset = np.frombuffer(raw[108:112], "<f4")[0] if len(raw) >= 112 else -1
    if len(raw) != _NIFTI1_HEADER + item or vox_offset != _NIFTI1_HEADER or raw[:4] != (348).to_bytes(4, "little"):
        return None                                     # not the layout assumed here: let ITK write the file
    header = bytearray(raw[:_NIFTI1_HEADER])
    header[42:48] = np.asarray(size, "<i2").tobytes()  # dim[1], dim[2], dim[3]
    return bytes(header)


def _write_stored_gzip(path: str, head: bytes, body) -> None:
    """A gzip file (RFC 1952) of ``head`` + ``body`` (anything with the buffer protocol: bytes, a C-contiguous array) as stored (uncompressed) deflate
    blocks of 65,535 bytes: the format ``gzip.open(path, "wb", compresslevel=0)`` writes, without its pass through
    zlib and without a plain file written first and read back. ``head`` is short (a header): it shares the first
    block with the start of ``body``, so only that block is copied."""
    import struct
    import zlib
    block = 65535
    if len(head) >= block:
        raise ValueError("_write_stored_gzip(): the head must be shorter than one block")
    body = memoryview(body).cast("B")
    crc = zlib.crc32(body, zlib.crc32(head)) & 0xFFFFFFFF
    total = len(head) + len(body)
    first, rest = bytes(head) + bytes(body[:block - len(head)]), body[block - len(head):]
    chunks = [first] + [rest[i:i + block] for i in range(0, len(rest), block)]
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")   # magic, deflate, no flags, mtime 0, OS unknown
        for n, chunk in enumerate(chunks):
            f.write(struct.pack("<BHH", int(n == len(chunks) - 1), len(chunk), len(chunk) ^ 0xFFFF))
            f.write(chunk)
        f.write(struct.pack("<II", crc, total & 0xFFFFFFFF))


@dataclass
class GridLines:
    """Polylines in LPS mm: ``points`` (N, 3) float64, ``lengths`` (L,) points per line (consecutive runs of
    ``points``), ``values`` (N,) float32 point scalar."""
    points: np.ndarray
    lengths: np.ndarray
    values: np.ndarray


def deformation_grid_lines(disp_lps, geom: Geometry, scalar: np.ndarray,
                           lines_per_axis: int = 16, affine_lps: np.ndarray | None = None) -> GridLines:
    """Lines of a regular lattice in fixed space, every vertex moved by T (x ↦ A(x + u(x))).

    ``disp_lps``: (K, J, I, 3) LPS mm on ``geom``, an array or any object with ``shape`` and ``at(kji)`` giving
    the (n, 3) displacement at integer indices (``compose.FieldOnGrid``: only the vertices are read);
    ``scalar``: (K, J, I) value sampled at each vertex;
    ``affine_lps``: 4×4 homogeneous LPS matrix of A (None: identity).
    Lines run along each index axis through every ``step``-th voxel of the other two axes; vertices sit on every
    ``max(1, step // 4)``-th voxel, so bends show.
    """
    shape = disp_lps.shape[:3]  # (K, J, I)
    steps = [max(1, int(round((n - 1) / max(lines_per_axis - 1, 1)))) for n in shape]
    m = geom.lps_from_ijk_matrix()
    if affine_lps is not None:
        a_lin, a_off = np.asarray(affine_lps, float)[:3, :3], np.asarray(affine_lps, float)[:3, 3]
    runs, lengths = [], []
    for axis in range(3):  # array axis the lines run along
        others = [a for a in range(3) if a != axis]
        res = max(1, steps[axis] // 4)
        along = np.arange(0, shape[axis], res)
        if along[-1] != shape[axis] - 1:
            along = np.append(along, shape[axis] - 1)
        for a in range(0, shape[others[0]], steps[others[0]]):
            for b in range(0, shape[others[1]], steps[others[1]]):
                idx = np.zeros((len(along), 3), dtype=int)
                idx[:, axis], idx[:, others[0]], idx[:, others[1]] = along, a, b
                runs.append(idx)
                lengths.append(len(idx))
    idx = np.concatenate(runs)                      # every vertex of every line, (N, 3) as (k, j, i)
    kji = tuple(idx.T)
    ijk1 = np.c_[idx[:, ::-1], np.ones(len(idx))]
    moved = (ijk1 @ m.T)[:, :3] + (disp_lps.at(kji) if hasattr(disp_lps, "at") else disp_lps[kji])
    pts = moved if affine_lps is None else moved @ a_lin.T + a_off
    return GridLines(np.asarray(pts, dtype=np.float64), np.asarray(lengths, dtype=np.int64),
                     np.asarray(scalar[kji], dtype=np.float32))


def _ascii_rows(values: np.ndarray, fmt: str, per_row: int) -> str:
    """Values as text, ``per_row`` to a line (legacy VTK readers take any whitespace; short lines stay readable)."""
    flat = values.ravel().tolist()
    rows = [" ".join([fmt] * len(flat[i:i + per_row])) % tuple(flat[i:i + per_row])
            for i in range(0, len(flat), per_row)]
    return "\n".join(rows) + "\n"


def write_grid_vtk_lps(lines: GridLines, path: str, scalar_name: str = "jacobian") -> None:
    """Legacy ASCII .vtk polydata (version 4.2, which every VTK reader takes) with the header comment Slicer reads
    as LPS coordinates (``SPACE=LPS``). Written without importing vtk (~0.5 s of import for one small file).

    Points keep 11 significant digits (as vtkPolyDataWriter writes doubles), the scalar 9 (float32 round trip).
    """
    n, n_lines = len(lines.points), len(lines.lengths)
    starts = np.concatenate([[0], np.cumsum(lines.lengths)[:-1]])
    cells = "\n".join(" ".join(map(str, [int(c)] + list(range(int(s), int(s) + int(c)))))
                       for s, c in zip(starts, lines.lengths)) + "\n"
    text = (f"# vtk DataFile Version 4.2\n3D Slicer output. SPACE=LPS\nASCII\nDATASET POLYDATA\n"
            f"POINTS {n} double\n" + _ascii_rows(lines.points, "%.11g", 9)
            + f"LINES {n_lines} {n_lines + n}\n" + cells
            + f"POINT_DATA {n}\nSCALARS {scalar_name} float 1\nLOOKUP_TABLE default\n"
            + _ascii_rows(lines.values, "%.9g", 9))
    with open(path, "w") as fh:
        fh.write(text)


@dataclass
class MapImage:
    """A named scalar map on the fixed grid (``<name>.nii.gz``), its unit and a one-line description. ``image``:
    the image, or a function that makes it — called by the writer thread, so resampling the map onto the fixed
    grid (~0.15 s for a 1 mm brain) overlaps the metrics (``write_result``)."""
    image: sitk.Image | Callable[[], sitk.Image]
    unit: str
    description: str = ""

    def resolved(self) -> sitk.Image:
        """The image (made now, once, when ``image`` is a function)."""
        if callable(self.image):
            self.image = self.image()
        return self.image


@dataclass
class ResultData:
    """Everything a result directory holds besides report.json, in memory (README, "The result contract").

    ``transform``/``inverse``: T and T⁻¹ as flat CompositeTransforms (compose.py says how they chain);
    ``jacobian``: (K, J, I) float32 det ∇T on ``fixed_geometry``; ``grid``: the deformation grid's lines;
    ``warped``/``warped_seg``: the moving image (segmentation) resampled onto the fixed grid through T;
    ``maps``: the method's extra maps, written as ``<name>.nii.gz``; ``affine``: A alone (affine.h5), a linear
    transform other modules can use without the deformable part."""
    transform: sitk.Transform
    jacobian: np.ndarray
    fixed_geometry: Geometry
    grid: GridLines
    warped: sitk.Image
    inverse: sitk.Transform | None = None
    warped_seg: sitk.Image | None = None
    maps: dict[str, MapImage] = field(default_factory=dict)
    affine: sitk.Transform | None = None   # the linear part A of T alone (initial alignment ∘ the method's affine)


def write_result(result_dir: AtomicResultDir, data: ResultData,
                 report: dict[str, Any] | Callable[[], dict[str, Any]],
                 before_report: Callable[[dict[str, Any]], None] | None = None,
                 parts: dict[str, float] | None = None, helper: bool = True) -> dict[str, Any]:
    """Write every file of a result directory: the files of ``data``, then report.json (``report`` with its
    "files" and "maps" entries filled in here). ``report``: the dict, or a function that makes it.

    The files are written by one writer thread, in the order of ``_file_jobs``, while this thread makes the report
    (the metrics); then this thread takes the files the writer has not started, from the last one back. SimpleITK's
    writers, zlib, torch and file writes release the GIL, so on a 1 mm brain the files (~0.5 s, the uncertainty
    map's resampling included) and the metrics (~0.2 s) overlap. ``before_report(report)`` runs when every other
    file is written, just before report.json (the pipeline adds its timings and peak memory there). ``parts``:
    filled with the seconds each file took on the thread that wrote it, by file name (report.json
    ``timings_s.write_parts``). The directory appears only when all of it is written; whatever fails or is
    cancelled, the writer thread has stopped before the partial directory is removed. ``helper=False``: no writer
    thread, the report and then the files on this thread (the same files). Returns ``report``."""
    parts = {} if parts is None else parts
    files: dict[str, str] = {}      # report.json "files", in the order of the jobs (all of them, once they ran)
    maps: dict[str, dict[str, str]] = {}
    failed = threading.Event()                          # after one file failed, no other is started

    def timed(key: str, fname: str, write: Callable[[str], None]) -> Callable[[], None]:
        files[key] = fname

        def job() -> None:
            if failed.is_set():
                return
            t0 = time.perf_counter()
            try:
                write(os.path.join(tmp, fname))
            except BaseException:
                failed.set()
                raise
            parts[fname] = round(time.perf_counter() - t0, 3)
        return job

    with result_dir as tmp:
        jobs = _file_jobs(data, timed, maps)
        # the pool's with-block waits for the writer on every way out, an exception (or Cancelled) included: it
        # sits inside result_dir's, whose exit removes the temporary directory
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepdiffreg-writer") if helper else None
        with writer if writer is not None else contextlib.nullcontext():
            futures = [writer.submit(job) if writer is not None else None for job in jobs]
            report = report() if callable(report) else report
            for fut, job in reversed(list(zip(futures, jobs))):
                if failed.is_set():
                    break
                if fut is None or fut.cancel():          # not started by the writer (or none): written here
                    job()
            for fut in futures:
                if fut is not None and not fut.cancelled():
                    fut.result()                         # a writer's error is raised here
        report.setdefault("files", {}).update(files)    # here every job has run: an error was raised above
        if maps:
            report.setdefault("maps", {}).update(maps)
        if before_report is not None:
            before_report(report)
        write_report(report, os.path.join(tmp, FILES["report"]))
    return report


def _file_jobs(data: ResultData, timed, maps: dict[str, dict[str, str]]) -> list[Callable[[], None]]:
    """The jobs that write the files of ``data`` (``timed(report key, file name, write(path))`` makes one per
    file), the costly ones first; ``maps`` gets report.json's "maps" entries. The .h5 transforms are one job, so
    that HDF5 (not thread-safe as ITK builds it) is only ever called by one thread at a time."""
    h5 = [timed("transform", FILES["transform"], lambda p: write_transform(data.transform, p))]
    if data.inverse is not None:
        h5.append(timed("inverse", FILES["inverse"], lambda p: write_transform(data.inverse, p)))
    if data.affine is not None:
        h5.append(timed("affine", FILES["affine"], lambda p: write_transform(data.affine, p)))

    def transforms() -> None:
        for job in h5:
            job()
    jobs: list[Callable[[], None]] = [transforms]
    jobs.append(timed("jacobian", FILES["jacobian"],
                      lambda p: write_scalar(data.jacobian, data.fixed_geometry, p, deflate=False)))
    jobs.append(timed("warped", FILES["warped"], lambda p: sitk.WriteImage(data.warped, p, useCompression=True)))
    for name, m in data.maps.items():
        jobs.append(timed(name, f"{name}.nii.gz", lambda p, m=m: write_image(m.resolved(), p, deflate=False)))
        maps[name] = {"file": f"{name}.nii.gz", "unit": m.unit, "description": m.description}
    if data.warped_seg is not None:
        jobs.append(timed("warped_seg", FILES["warped_seg"],
                          lambda p: sitk.WriteImage(data.warped_seg, p, useCompression=True)))
    jobs.append(timed("grid", FILES["grid"], lambda p: write_grid_vtk_lps(data.grid, p)))
    return jobs


def write_report(report: dict, path: str) -> None:
    """report.json as strict JSON: NaN/Inf (a Dice of a label that is absent, a TRE of no points) become null."""
    with open(path, "w") as fh:
        fh.write(dumps(report, indent=2))
