"""Learning-rate and margin schedules as pure functions of the training step.

A step is named by (epoch, step within the epoch, steps of that epoch), counted from 1, so a resumed run
recomputes exactly the values an uninterrupted one used. Steps per epoch may differ from epoch to epoch (the
pair samplers of clip and blip plan each epoch anew): the schedules run over the epochs completed,
p = (epoch - 1) + (step - 1) / steps, which ends at max_epoch - 1 / steps on the last step of the last epoch
whatever the counts. Kept apart from trainECAPAModel.py so that each schedule reads, and is tested, as the
formula it is.

  step_lr        lr * lr_decay ** ((epoch - 1) // every)                the original StepLR (per epoch)
  warmup_exp     lr rises linearly from 0 over `warmup_epochs`, while decaying exponentially from lr at the
                 first step to final_lr at the last                       (wespeaker's ECAPA recipe)
  margin         0 before epoch `start`, rising linearly to m at the beginning of epoch `end`, m after
"""


def epochs_done(epoch, step, steps_in_epoch):
    """p: the epochs completed when `step` of `epoch` begins, 0 at the first step of epoch 1."""
    return (epoch - 1) + (step - 1) / steps_in_epoch


def step_lr(lr, lr_decay, every, epoch):
    return lr * lr_decay ** ((epoch - 1) // every)


def warmup_exp(lr, final_lr, warmup_epochs, max_epoch, epoch, step, steps_in_epoch):
    """With a fixed count S of steps an epoch this is lr * (final_lr / lr) ** ((n - 1) / (max_epoch * S - 1))
    times min(1, n / (warmup_epochs * S)) at the n-th step; written over p, it ends on final_lr also when
    the counts vary."""
    done = epochs_done(epoch, step, steps_in_epoch)
    last = max_epoch - 1 / steps_in_epoch  # p at the last step of an epoch of this many steps
    decayed = lr * (final_lr / lr) ** (done / last if last > 0 else 0.0)
    if warmup_epochs <= 0:
        return decayed
    return decayed * min(1.0, (done + 1 / steps_in_epoch) / warmup_epochs)


def margin(m, start, end, epoch, step, steps_in_epoch):
    """The margin at a step, linear in p between the beginnings of epochs `start` and `end`."""
    done = epochs_done(epoch, step, steps_in_epoch)
    if end <= start:
        return m if done >= start - 1 else 0.0
    return m * min(1.0, max(0.0, (done - (start - 1)) / (end - start)))


def training_schedule(args):
    """(epoch, step, steps of that epoch) -> (learning rate, margin) for the flags in `args`."""
    def at(epoch, step, steps_in_epoch):
        if args.scheduler == 'warmup_exp':
            lr = warmup_exp(args.lr, args.final_lr, args.warmup_epochs, args.max_epoch, epoch, step, steps_in_epoch)
        else:
            lr = step_lr(args.lr, args.lr_decay, args.lr_decay_every, epoch)
        if args.margin_schedule:
            return lr, margin(args.m, *args.margin_schedule, epoch, step, steps_in_epoch)
        return lr, args.m
    return at
