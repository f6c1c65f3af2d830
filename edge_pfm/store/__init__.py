"""The bundle store on the device: updates that never lose the last good bundle.

    store.py   the layout ([bundles] store): versions/, the `current` and `previous` links, staging/, failed/,
               inbox/, one lock; atomic link switches, clean-up of an interrupted update, the keep/disk cap
    stage.py   a bundle directory or .tar copied into staging/ safely (no path out, no links, no devices) and fsynced
    update.py  stage -> verify (signature, rollback floor) -> check the engine on this device -> install -> switch;
               commit (the old bundle becomes `previous`, the floor rises) or roll back

`edge-pfm update SOURCE` runs it from the command line; a running `serve` runs the same steps for its inbox and
switches at a pair boundary (edge_pfm.service.updates).
"""
