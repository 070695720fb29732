"""``advedge pipeline``: teacher -> ADD student -> purifier -> export -> bench -> report.

Stages, each a call into advedge's own API, each writing under ``--out``:

1. ``teacher``   PGD-AT teacher (``advedge train``)                       -> ``teacher/``
2. ``student``   ADD-distilled student (``advedge distill --method add``)  -> ``student/``
3. ``purifier``  IPCM purifier guarding the student (``advedge purifier train``) -> ``purifier/``
4. ``export``    fp32, fp16 and int8 (QDQ) ONNX of the student and of the fused
                 purifier + student (``advedge export``)                  -> ``export/``
   ``qat``       with ``qat: true``: robust QAT of the student's INT8 file, ADD from the
                 teacher with fake quantisation in the loop (``advedge qat --ptq``) -> ``qat/``
5. ``bench``     latency and robust accuracy of every artifact and of their PyTorch parents
                 (``advedge bench --robust``)                             -> ``bench/``
6. ``report``    table, Pareto plot, training curves (``advedge report``) -> ``report/``

Every option and the data are checked before any stage is touched. A stage's key is the sha256
of its options, of the key of the stage before it, and of the sha256 of every file it reads (the
data, and the outputs of the stages it depends on), so a stage whose inputs changed in any way
is redone, and with it everything downstream. A stage is skipped when
``.pipeline/<stage>.json`` records that it finished with the same key and its outputs are there.
A stage killed midway (its record says ``running`` with the same key) resumes from its last
epoch. A stage that must be redone keeps its finished outputs in ``.superseded/<stage>/`` until
the new run has finished, so a failed redo loses nothing; the whole run holds the output lock of
``--out`` (one writer).
"""

from advedge.workflow.presets import (
    PRESETS,
    STAGES,
    Preset,
    check_preset,
    load_preset,
    pipeline_stages,
)
from advedge.workflow.run import headline, run_pipeline

__all__ = [
    "PRESETS",
    "STAGES",
    "Preset",
    "check_preset",
    "headline",
    "load_preset",
    "pipeline_stages",
    "run_pipeline",
]
