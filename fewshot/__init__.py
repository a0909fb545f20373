"""The few-shot protocol around the adapter in hegraphadapter.py, one module per job:

    datasets, prompts, download   the benchmarks in CoOp's layouts, your own folders, the prompts, --download
    backbones                     which CLIP, loaded through open_clip with its own preprocessing
    extraction, features          CLIP features of a dataset into one file, and that file's contract
    methods, baselines            one row per method (model, published configuration and recipe, knobs)
    tasks, training               one seed's K-shot task; training, evaluation and the knob search
    runs, checkpoints             a train.py run planned from plain values and recorded; saved models
    cli, errors, ranges, files, devices    the command lines, user errors, number ranges, safe files, devices
    report, sweep                 the paper's protocol: a resumable sweep, its tables and figures
    testing                       tiny fixtures and the registry of bad inputs, for the tests and the bench
"""
