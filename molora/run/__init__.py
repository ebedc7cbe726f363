"""The run wing: the training application around the tuner.

* :mod:`.recipe` -- YAML recipes (torch-free validation); :mod:`.data` -- rows, prompts, tokenisation;
  :mod:`.evaluation`, :mod:`.label_logits` -- accuracy by option log-likelihood or generation;
* :mod:`.train` -- ``molora train`` (the run), :mod:`.trainer` -- the Trainer subclass, :mod:`.common` --
  helpers shared by train, eval and sweep; :mod:`.eval_run` -- ``molora eval``; :mod:`.sweep` -- ``molora sweep``;
  :mod:`.allocate` -- ``auto:`` allocations of a recipe; :mod:`.merge_cmd` -- ``molora merge-experts``;
* :mod:`.checkpoint`, :mod:`.resume`, :mod:`.storage`, :mod:`.nonfinite`, :mod:`.host_memory` -- reliability;
* :mod:`.telemetry`, :mod:`.report`, :mod:`.diagnostics` -- what the routers did; :mod:`.assets` -- the packaged
  model and data; :mod:`.cli` -- the ``molora`` command.

Depends on :mod:`molora.tuner` and :mod:`molora.allocation`; nothing outside this wing imports it.
"""
