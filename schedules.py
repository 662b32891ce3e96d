"""Learning-rate and margin schedules as pure functions of the training step.

A step is named by (epoch, step within the epoch, steps per epoch), both counts from 1, so a resumed run
recomputes exactly the values an uninterrupted one used. Kept apart from trainECAPAModel.py so that each
schedule reads, and is tested, as the formula it is.

  step_lr        lr * lr_decay ** ((epoch - 1) // test_step)            the original StepLR (per epoch)
  warmup_exp     lr rises linearly from 0 over `warmup_epochs`, while decaying exponentially from lr at the
                 first step to final_lr at the last                       (wespeaker's ECAPA recipe)
  margin         0 before epoch `start`, rising linearly to m at the beginning of epoch `end`, m after
"""


def global_step(epoch, step, steps_per_epoch):
    """1 for the first step of epoch 1."""
    return (epoch - 1) * steps_per_epoch + step


def step_lr(lr, lr_decay, test_step, epoch):
    return lr * lr_decay ** ((epoch - 1) // test_step)


def warmup_exp(lr, final_lr, warmup_epochs, max_epoch, epoch, step, steps_per_epoch):
    done = global_step(epoch, step, steps_per_epoch)
    total = max_epoch * steps_per_epoch
    decayed = lr * (final_lr / lr) ** ((done - 1) / max(1, total - 1))
    warmup_steps = warmup_epochs * steps_per_epoch
    return decayed * min(1.0, done / warmup_steps) if warmup_steps > 0 else decayed


def margin(m, start, end, epoch, step, steps_per_epoch):
    """The margin at a step: epochs are counted as completed fractions, (epoch - 1) + (step - 1) / steps."""
    progress = (epoch - 1) + (step - 1) / steps_per_epoch
    if end <= start:
        return m if progress >= start - 1 else 0.0
    return m * min(1.0, max(0.0, (progress - (start - 1)) / (end - start)))


def training_schedule(args, steps_per_epoch):
    """(epoch, step) -> (learning rate, margin) for the flags in `args`."""
    def at(epoch, step):
        if args.scheduler == 'warmup_exp':
            lr = warmup_exp(args.lr, args.final_lr, args.warmup_epochs, args.max_epoch, epoch, step, steps_per_epoch)
        else:
            lr = step_lr(args.lr, args.lr_decay, args.test_step, epoch)
        if args.margin_schedule:
            return lr, margin(args.m, *args.margin_schedule, epoch, step, steps_per_epoch)
        return lr, args.m
    return at
