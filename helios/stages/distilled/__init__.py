"""Stage 3's parts (paper §3.4): the roles (:mod:`.roles`), the Staged Backward Simulation (:mod:`.rollout`),
the two phases (:mod:`.ode_init`: Staged ODE Init; :mod:`.post`: DMD + GAN) and the generator's EMA
(:mod:`.generator_ema`); :class:`helios.stages.stage3_distilled.Stage3Distilled` wires them to the
trainer's hooks."""
