"""The tuner wing: the PEFT method itself.

* :mod:`.config` -- :class:`MoLoRAConfig`; :mod:`.layer` -- the MoLoRA linear layer; :mod:`.model` -- the
  tuner (injection, aux loss, merging); :mod:`.injection` -- where a model's numbered blocks are;
  :mod:`.router_state` -- router statistics and the MoLA aux loss; :mod:`.summary` -- the allocation table;
  :mod:`.convert` -- import of the original MoLA checkpoints; :mod:`.merge` -- fewer experts after training;
  :mod:`.registry` / :mod:`.peft_type` -- registration with PEFT; :mod:`.compat` -- version seams with
  transformers and PEFT.

Depends on :mod:`molora.allocation` (specs) and :mod:`molora_kernels`; never on :mod:`molora.run`.
"""
