"""Sweeps: :mod:`raytune_ft.sweep.tune` runs a spec's ``tune:`` section on Ray Tune (search, scheduler, one
whole run per trial); :mod:`raytune_ft.sweep.results` reads and writes what comes out (the results table and
the winner's spec). The spec-time checks of ``tune.space`` live in :mod:`raytune_ft.spec.space`.

Nothing is imported here: ``rtf sweep results`` reads results without loading Ray Tune."""
