"""`edgeopt prune`: the build's prune step alone, ONNX to ONNX.

The model is loaded and simplified exactly as `build` does (so the same groups are found), pruned,
checked with the ONNX checker and written atomically. With a target the kept widths are multiples
of its channel multiple; without one, of `channel_multiple` (1 unless given).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeopt.errors import OutputError
from edgeopt.runtime.errors import OptionError
from edgeopt.runtime.kinds import PruneCriterion
from edgeopt.targets import Target, get_target

__all__ = ["PruneOutcome", "prune"]


@dataclass(frozen=True)
class PruneOutcome:
    output: Path
    report: dict  # converters.prune.PruneReport as JSON
    changed: bool

    def summary_text(self) -> str:
        r = self.report
        lines = [
            f"pruned {self.output} ({r['criterion']}, ratio {r['ratio']:g}{', one global ranking' if r['global_ranking'] else ''},"
            f" widths multiples of {r['channel_multiple']})",
            f"  groups   {r['groups_pruned']} of {r['groups_found']} pruned",
            f"  MACs     {r['macs_before'] / 1e6:.1f} M -> {r['macs_after'] / 1e6:.1f} M"
            f"  ({100 * (1 - r['macs_after'] / max(r['macs_before'], 1)):.0f}% fewer)",
            f"  params   {r['parameters_before']:,} -> {r['parameters_after']:,}",
        ]
        for group in r["groups"]:
            if not group["pruned"]:
                lines.append(f"  kept     {', '.join(group['layers'][:3])}{' ...' if len(group['layers']) > 3 else ''}: {'; '.join(group['why'])}")
        return "\n".join(lines)


def prune(
    model: str | Path,
    output: str | Path,
    *,
    ratio: float,
    target: str | Target | None = None,
    channel_multiple: int | None = None,
    criterion: str | PruneCriterion = PruneCriterion.AUTO,
    global_ranking: bool = False,
    protected: Iterable[str] = (),
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    calibration: str | Path | Iterable[Mapping[str, np.ndarray]] | None = None,
    force: bool = False,
) -> PruneOutcome:
    """Prune `model` to `output` (see `edgeopt.converters.prune`); `input_shapes` fixes dynamic inputs
    so that reshapes after convolutions can be traced (as `build` does from its data); the taylor
    criterion runs on `calibration` (as `build --calibration` reads it); `auto` is taylor when `calibration` is given and
    torch is installed, else l2."""
    import onnx

    from edgeopt.converters.analysis import io_specs, load_model
    from edgeopt.converters.passes import simplify
    from edgeopt.converters.prune import PruneOptions, batchnorm_scales, resolve_criterion
    from edgeopt.converters.prune import prune as prune_graph
    from edgeopt.pipeline import _parse_named

    if target is not None and channel_multiple is not None:
        raise OptionError("--target and --channel-multiple both say the channel multiple", hint="give one of them")
    multiple = (target if isinstance(target, Target) else get_target(target)).channel_multiple if target is not None else channel_multiple or 1
    output_path = Path(output)
    if output_path.exists() and not (force and output_path.is_file()):
        raise OutputError(f"{output_path} already exists", hint="choose another -o, or pass --force to replace the file")
    chosen = resolve_criterion(_parse_named(PruneCriterion, criterion, "pruning criterion"), has_data=calibration is not None)
    if chosen is PruneCriterion.TAYLOR and calibration is None:
        raise OptionError("the taylor criterion ranks channels on calibration data", hint="pass --calibration data.npz, or use --criterion l2")
    source = load_model(model)
    samples: tuple[Mapping[str, np.ndarray], ...] = ()
    if chosen is PruneCriterion.TAYLOR:
        from edgeopt.converters.data import open_dataset
        from edgeopt.converters.prune.taylor import SAMPLES  # BackendUnavailableError without torch

        samples = tuple(open_dataset(calibration, io_specs(source)[0], role="calibration").take(SAMPLES))
    simplified, _ = simplify(source, input_shapes)
    options = PruneOptions(
        ratio=ratio,
        criterion=chosen,
        channel_multiple=multiple,
        global_ranking=global_ranking,
        protected=tuple(protected),
        bn_scales=batchnorm_scales(source) if chosen is PruneCriterion.BN_SCALE else {},
        samples=samples,
    )
    result = prune_graph(simplified, options)
    onnx.checker.check_model(result.model)
    staged = output_path.with_name(f".{output_path.name}.partial")
    try:
        onnx.save(result.model, staged)
        os.replace(staged, output_path)
    except OSError as error:
        staged.unlink(missing_ok=True)
        raise OutputError(f"cannot write {output_path}: {error.strerror}", hint="check the folder exists and is writable") from None
    return PruneOutcome(output_path, dict(result.report), result.changed)
