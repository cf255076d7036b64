"""Stage 3's parts (paper §3.4): the roles (:mod:`.roles`, the generator's declaring its EMA, which the
trainer keeps: :class:`helios.infra.ema.ModelEma`), the Staged Backward Simulation (:mod:`.rollout`) and
the two phases (:mod:`.ode_init`: Staged ODE Init; :mod:`.post`: DMD + GAN);
:class:`helios.stages.stage3_distilled.Stage3Distilled` wires them to the trainer's hooks."""
