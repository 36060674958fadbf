"""English texts of the lab. Keys and placeholders: see ``batchnorm/lab/locales/__init__.py``.

English is also the language of everything machines read: the summary's keys
and text values in ``metrics.json`` and ``--json``, and the run ids that name
the cached run files, are these texts whatever ``--lang`` says.
"""

MESSAGES = {
    # ---------------------------------------------------------------- runs and series
    "label.bn": "BN",
    "label.no_bn": "no BN",
    "label.bn_after_relu": "BN after ReLU",
    "label.bn_before_relu": "BN before ReLU",
    "label.groupnorm": "GroupNorm",
    "label.layernorm": "LayerNorm",
    "label.renorm": "Batch Renorm",
    "label.ghost": "ghost BN (8)",
    "label.bn_network": "BN network",
    "run.batch_size": "{label} bs={batch_size}",
    "run.lr": "{label} lr={lr}",
    "run.init": "{label} x{scale:g}",
    "series.train": "{label} (train)",
    "series.validation": "{label} (validation)",
    "value.yes": "yes",
    "value.no": "no",
    # ---------------------------------------------------------------- summary columns
    "col.run": "run",
    "col.norm": "norm",
    "col.condition": "condition",
    "col.batch_size": "batch size",
    "col.lr": "lr",
    "col.weight_scale": "weight scale",
    "col.steps": "steps",
    "col.final_val_acc": "final val acc",
    "col.best_val_acc": "best val acc",
    "col.val_acc": "val acc",
    "col.train_acc": "train acc",
    "col.acc_gap": "acc gap (train - val)",
    "col.final_test_acc": "final test acc",
    "col.acc_at": "acc @ {thousands}k",
    "col.steps_to": "steps to {target:.0%}",
    "col.final_train_loss": "final train loss",
    "col.final_val_loss": "final val loss",
    "col.train_seconds": "train seconds",
    "col.diverged": "diverged",
    "col.median_drift": "median drift",
    # ---------------------------------------------------------------- plots
    "curves.title": "Training curves",
    "panel.loss": "Loss",
    "panel.accuracy": "Accuracy",
    "panel.val_accuracy": "Validation accuracy",
    "panel.test_accuracy": "Test accuracy",
    "axis.step": "training step",
    "axis.loss": "cross-entropy loss",
    "axis.accuracy": "accuracy",
    "axis.val_accuracy": "validation accuracy",
    "axis.batch_size": "batch size",
    "axis.lr": "learning rate (SGD, momentum 0.9)",
    "axis.weight_scale": "weight scale factor",
    "axis.preactivation": "pre-activation value",
    "plot.no_data": "no data",
    # ---------------------------------------------------------------- compare
    "compare.description": "with vs without BN, same seed and initial weights: curves, "
                           "steps to a target accuracy, wall time (the demo)",
    "compare.title": "Training with and without Batch Normalization",
    "compare.claim": "BN speeds up training: with the same initial weights, data order and "
                     "learning rate, the network with BN reaches a given accuracy in fewer "
                     "steps.",
    "compare.caption": "Loss (dashed: training, averaged since the previous point; solid: "
                       "validation) and validation accuracy against training steps, with and "
                       "without BN.",
    "compare.note_both": "BN reached {target:.0%} validation accuracy in {bn} steps, without "
                         "BN it took {plain} steps ({ratio:.1f}x).",
    "compare.note_bn_only": "BN reached {target:.0%} validation accuracy in {bn} steps; "
                            "without BN the run never did.",
    "compare.note_none": "No run reached {target:.0%} validation accuracy in this budget.",
    # ---------------------------------------------------------------- placement
    "placement.description": "BN after the ReLU (the course's code) vs before it (fused "
                             "activation) vs no BN",
    "placement.title": "Where to put BN: before or after the activation",
    "placement.claim": "The BN paper normalizes the input of the nonlinearity (BN before the "
                       "ReLU); the course's Keras code puts it after. Both train; which is "
                       "better depends on the model.",
    "placement.caption": "BN placed after the ReLU, before it (our BatchNorm2d(..., "
                         "activation='relu')), and no BN, from the same initial weights.",
    # ---------------------------------------------------------------- batch-size
    "batch-size.description": "BN vs GroupNorm vs LayerNorm (and Batch Renorm, ghost BN) for "
                              "batch sizes from 2 to 256",
    "batch-size.title": "Batch size: where BN's statistics get noisy",
    "batch-size.claim": "BN estimates the mean and variance from the mini-batch: with very "
                        "small batches the estimates are noisy and training and inference "
                        "statistics disagree.",
    "batch-size.figure": "Validation accuracy against batch size",
    "batch-size.caption": "Final validation accuracy (eval mode) after the same number of "
                          "epochs, learning rate proportional to the batch size. BN's "
                          "statistics come from the mini-batch, so small batches hurt it; "
                          "GroupNorm and LayerNorm do not depend on the batch. Batch Renorm "
                          "corrects the batch statistics towards the running ones; ghost BN "
                          "normalizes groups of 8 samples (batches above 8 only).",
    "batch-size.panel": "Accuracy vs batch size",
    # ---------------------------------------------------------------- lr
    "lr.description": "a learning-rate sweep with and without BN",
    "lr.title": "Learning rate: how much BN widens the usable range",
    "lr.claim": "BN allows higher learning rates: without it, large rates diverge or stall.",
    "lr.figure": "Validation accuracy against learning rate",
    "lr.caption": "Final validation accuracy after the same number of steps for each learning "
                  "rate (0 where the loss diverged). BN keeps the scale of each layer's input "
                  "fixed, so it tolerates larger learning rates.",
    "lr.panel": "Accuracy vs learning rate",
    # ---------------------------------------------------------------- init
    "init.description": "a badly scaled initialization with and without BN",
    "init.title": "Initialization: BN makes training robust to the weights' scale",
    "init.claim": "Without BN, weights initialized too small or too large make signals vanish "
                  "or explode; with BN each layer's input is renormalized.",
    "init.figure": "Validation accuracy against the scale of the initial weights",
    "init.caption": "Every conv and linear weight multiplied by a factor after the default "
                    "initialization. BN renormalizes each layer's output, so the scale of the "
                    "weights before it hardly matters.",
    "init.panel": "Accuracy vs initial weight scale",
    # ---------------------------------------------------------------- modes
    "modes.description": "the inference pitfalls measured: evaluating in train mode, a batch "
                         "of one, statistics left stale after the data shift",
    "modes.title": "Training mode vs inference mode",
    "modes.claim": "BN behaves differently in training (batch statistics, running statistics "
                   "updated) and inference (running statistics, fixed): forgetting "
                   "model.eval(), tiny batches and stale statistics after a data shift all "
                   "cost accuracy.",
    "modes.eval": "eval mode (correct)",
    "modes.train_500": "train mode, batches of 500",
    "modes.train_8": "train mode, batches of 8",
    "modes.single": "eval mode, one image at a time",
    "modes.stale": "shifted data, stale statistics",
    "modes.recomputed": "shifted data, recomputed statistics",
    "modes.note_eval": "In eval mode a prediction does not depend on the rest of the batch: "
                       "one image at a time gives {single:.1%}, batches of 500 give "
                       "{batched:.1%}.",
    "modes.note_single_ran": "A batch of one in train mode ran (spatial positions gave the "
                             "statistics).",
    "modes.note_single_fails": "A batch of one in train mode fails: the dense BN layer raises "
                               "\"{error}\". Even where it runs, a single image's statistics "
                               "would normalize away the very features that identify it.",
    "modes.note_shift": "The shift halves the contrast and brightens the images, as a new "
                        "camera might. Recomputing the running statistics on shifted training "
                        "images, with no weight changed, changes accuracy by {gain:+.1%}.",
    "modes.figure": "One trained network, evaluated several ways",
    "modes.caption": "Validation accuracy of the same trained BN network: in eval mode "
                     "(running statistics), in train mode by mistake (batch statistics of 500 "
                     "or 8 images), one image at a time, and on shifted data before and after "
                     "recomputing the running statistics.",
    "modes.panel": "Validation accuracy of the BN network",
    # ---------------------------------------------------------------- regularization
    "regularization.description": "the train vs validation gap with and without BN",
    "regularization.title": "Does BN regularize?",
    "regularization.claim": "BN adds noise (each sample is normalized with its batch's "
                            "statistics), which acts as a mild regularizer: the gap between "
                            "training and validation accuracy can shrink.",
    "regularization.figure": "Training vs validation accuracy",
    "regularization.caption": "Training on {size} images for many epochs: dashed lines are the "
                              "training accuracy (in train mode, averaged since the previous "
                              "point), solid lines the validation accuracy. The space between "
                              "them is the generalization gap.",
    "regularization.curves_caption": "Loss and validation accuracy of the same runs.",
    # ---------------------------------------------------------------- distributions, paper-mnist
    "distributions.description": "per-layer activation percentiles (15/50/85) over training, "
                                 "with and without BN (the paper's Figure 1 b/c)",
    "distributions.title": "How the input of a sigmoid moves during training",
    "distributions.claim": "Internal covariate shift: without BN the distribution of each "
                           "layer's input keeps changing while the earlier layers learn; BN "
                           "holds its mean and spread fixed.",
    "distributions.note_drift": "'{column}' is how far the median input of layer {layer} moved "
                                "between the first and the last recorded step.",
    "paper-mnist.description": "the BN paper's Figure 1 on full MNIST: batch 60, 50,000 steps "
                               "(--quick: 3,000), test accuracy and a sigmoid's input",
    "paper-mnist.title": "The BN paper's MNIST experiment",
    "paper-mnist.claim": "Ioffe & Szegedy (2015), Figure 1: with BN the network trains faster "
                         "and reaches higher test accuracy, and the input distribution of its "
                         "sigmoids is stable.",
    "paper.accuracy_figure.validation": "Validation accuracy against training steps",
    "paper.accuracy_figure.test": "Test accuracy against training steps",
    "paper.accuracy_caption.validation": "The paper's Figure 1(a): validation accuracy of the "
                                         "784-100-100-100-10 sigmoid network with and without "
                                         "BN.",
    "paper.accuracy_caption.test": "The paper's Figure 1(a): test accuracy of the "
                                   "784-100-100-100-10 sigmoid network with and without BN.",
    "paper.sigmoid_figure": "The input of a sigmoid in the last hidden layer over training",
    "paper.sigmoid_caption": "The paper's Figure 1(b, c): the 15th, 50th and 85th percentiles "
                             "(band and line) of the values entering one layer's sigmoids. "
                             "Without BN the distribution drifts as the earlier layers change; "
                             "with BN it stays put.",
    "paper.sigmoid_panel": "Input to a sigmoid, {label}",
    # ---------------------------------------------------------------- report.html
    "report.page_title": "{title} · batchnorm lab",
    "report.kicker": "batchnorm lab · {experiment}",
    "report.claim": "Claim tested.",
    "report.reproduce": "Reproduce",
    "report.summary": "Summary",
    "report.findings": "Findings",
    "report.figures": "Figures",
    "report.no_rows": "(no rows)",
    "env.date": "date",
    "env.device": "device",
    "env.cpu_threads": "cpu threads",
    "env.wall_time": "wall time",
    # ---------------------------------------------------------------- terminal
    "progress.unit": "step",
    "cli.report": "report: {path}  ({seconds:.1f} s)",
    "cli.interrupted": "interrupted: finished runs are kept; run the same command to resume",
    "cli.error": "batchnorm: error: {message}",
    "cli.positive_int": "expected a positive integer, got {value}",
    "cli.positive_float": "expected a positive number, got {value}",
    "cli.description": "Batch Normalization for PyTorch: the lab, and information on the "
                       "backends.",
    "cli.epilog": "examples:\n"
                  "  batchnorm lab compare          # the demo: train with and without BN, "
                  "write a report\n"
                  "  batchnorm lab compare --lang es  # the same, report in Spanish\n"
                  "  batchnorm lab list             # every experiment, one line each\n"
                  "  batchnorm info                 # versions and the backend each device "
                  "uses\n",
    "cli.info_help": "versions and the backend each device would use",
    "cli.lab_help": "train small networks with and without BN and write a report",
    "cli.lab_description": "Run one of the lab's experiments and write a report with plots.",
    "cli.lab_epilog": "experiments:\n{experiments}\n\nexamples:\n"
                      "  batchnorm lab compare\n"
                      "  batchnorm lab batch-size --quick\n"
                      "  batchnorm lab paper-mnist --data-root .cache/mnist\n"
                      "  batchnorm lab compare --device cuda --json\n"
                      "  batchnorm lab compare --lang es",
    "cli.help.experiment": "an experiment name, or 'list'",
    "cli.help.dataset": "data set (default: the experiment's; mnist5k ships with the install)",
    "cli.help.data_root": "folder with the data set's files (make data: .cache/mnist)",
    "cli.help.out": "parent folder of run folders (default: runs)",
    "cli.help.device": "cpu or cuda (default: cpu)",
    "cli.help.seed": "seed of every run (default: 0)",
    "cli.help.epochs": "epochs per run",
    "cli.help.steps": "optimizer steps per run (over --epochs)",
    "cli.help.batch_size": "mini-batch size",
    "cli.help.lr": "learning rate",
    "cli.help.arch": "network",
    "cli.help.quick": "a tiny configuration (seconds)",
    "cli.help.json": "print the result as JSON (summary keys in English whatever --lang)",
    "cli.help.no_progress": "no progress bars",
    "cli.help.lang": "language of the report and of the terminal output (default: from "
                     "LC_ALL, LC_MESSAGES or LANG, here {default})",
    "error.unknown_experiment": "unknown experiment {name!r}; expected one of {names}",
    "error.no_cuda": "--device cuda was asked for but CUDA is not available",
}
