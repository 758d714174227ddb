"""
One run's plan: minion options and pillar ``shadowsocks:tuning`` resolved
once into settings, then both halves planned (kernel sysctls, daemon
open-file limits), every problem of either collected, and the record of
originals and of restarts in progress checked, all before anything is
written. A problem anywhere stops every function that acts.

The Salt states of one ``state.apply`` share one plan: the first state
makes it (``shadowsocks_tuning.plan``), the others take it from the run's
``__context__`` (see ``_states/shadowsocks_tuning.py``), and a state that
writes marks what it changed (``Plan.used``) so that nothing stale is acted
on twice. Plain values in and out; no Salt dunders here.
"""

from salt.exceptions import CommandExecutionError, SaltInvocationError

import sstuning_journal as journal
import sstuning_limits as limits
import sstuning_procfs as procfs
import sstuning_settings
import sstuning_sysctl as sysctl

# Arguments that change what a run plans (the states' own, such as `part`, do not).
PLANNING_ARGUMENTS = ("profile", "sysctls", "config", "force", "policy", "congestion_fallback", "nofile", "limits")


class Plan(dict):
    """What one run would do, planned once. The mapping is what a person
    reads (``salt-call shadowsocks_tuning.plan``); the attributes are what the
    acting functions work from. Only a Plan made here is taken by them: a
    mapping typed on a command line is not one.

    settings, options   the resolved settings (None when pillar is invalid) and minion options
    sysctl, limits      the two halves (``sstuning_sysctl.plan``, ``sstuning_limits.plan``)
    originals           the record of originals as the plan read it (None when it is broken): a
                        check only; every write reads it again under the lock
    pending             restarts an earlier run began and did not finish
    errors              every problem: any one stops every function that acts
    test                planned as a dry run (no module loaded)
    used                what a write has consumed: ``sysctl``, ``limits:PART``, and ``processes``
                        once a process was started or stopped
    """

    def __init__(self, arguments, test, options, settings=None, sysctl_half=None, limits_half=None,
                 originals=None, pending=(), errors=(), seen=None):
        self.arguments, self.test, self.options, self.settings = dict(arguments), bool(test), options, settings
        self.sysctl, self.limits, self.originals = sysctl_half, limits_half, originals
        self.pending, self.errors, self.used = list(pending), list(errors), set()
        # What the plan read from disk, looked at *before* reading it (``seen``):
        # another run that writes meanwhile, even a moment later, makes it stale.
        self.stamps, self.generation = seen or _seen(settings, options)
        super().__init__(
            ok=not self.errors,
            errors=self.errors,
            notes=list(settings["notes"]) if settings else [],
            sysctl={"changes": sysctl_half["changes"], "comment": sysctl_half["comment"]} if sysctl_half else None,
            limits=_limits_view(limits_half) if limits_half else None,
            pending_restarts=self.pending,
        )

    def stale(self):
        """Whether another run wrote since the plan looked: a file it read
        changed, or a write under the lock (live values too) was counted."""
        return (journal.generation(self.options["state_dir"]) != self.generation
                or any(journal.stamp(path) != stamp for path, stamp in self.stamps.items()))

    def written(self, half, changed=True, processes=False):
        """After a write of this run: ``half`` is consumed, the write is
        counted for other runs (when it ``changed`` anything), and what it
        wrote is the plan's new view of those files. ``processes``: it
        started or stopped a process, so the plan's process table is spent
        too (a live raise keeps every pid; the limits are read again anyway)."""
        self.used.add(half)
        if processes:
            self.used.add("processes")
        if changed:
            journal.bump(self.options["state_dir"])
        self.stamps, self.generation = _seen(self.settings, self.options)

    def fresh_for(self, half):
        """Whether ``half`` (``sysctl``, ``limits:PART``, ``processes``) can
        still be acted on: no write of this run has consumed it."""
        return half not in self.used


def _seen(settings, options_):
    """(stamps of the files a plan of ``settings`` reads, the write count)."""
    paths = set()
    if settings:
        paths |= sysctl.managed_paths(settings, options_) | limits.managed_paths(settings, options_)
        paths |= {journal.originals_path(options_["state_dir"]), journal.restarts_path(options_["state_dir"])}
    return {path: journal.stamp(path) for path in sorted(paths)}, journal.generation(options_["state_dir"])


def _limits_view(half):
    files = [{"path": item["path"], "what": item["what"], "old": item["old"], "new": item["new"],
              "changed": item["changed"], "comment": item["comment"]}
             for groups in half["parts"].values() for group in groups for item in group["files"]]
    processes = [{"pid": p["pid"], "name": p["name"], "soft": p["soft"], "hard": p["hard"], "action": p["action"],
                  "why": p["why"]} for p in half["processes"].values()]
    return {"files": files, "processes": processes, "notes": half["notes"]}


def options(get):
    """The minion options, read once through ``get`` (``__opts__.get``)."""
    return sstuning_settings.options(get)


def resolve(options_, pillar, arguments=None):
    """Settings from pillar ``shadowsocks:tuning`` and ``arguments`` against
    this box's facts (``nr_open``, systemd, what a restart can grant).
    Raises SaltInvocationError naming every problem."""
    box = dict(limits.box(options_), **sysctl.box(options_))
    return sstuning_settings.resolve(sstuning_settings.pillar_tuning(pillar), arguments, box)


def make(options_, pillar, arguments, test):
    """The plan of a run: resolve, plan both halves, check the records. A
    pillar that does not resolve gives a Plan whose ``errors`` say why."""
    arguments = {k: v for k, v in (arguments or {}).items() if v is not None}
    try:
        settings = resolve(options_, pillar, arguments)
    except SaltInvocationError as exc:
        return Plan(arguments, test, options_, errors=[str(exc)])
    seen = _seen(settings, options_)  # before anything is read
    # One look at the processes for the whole run: the ports the kernel half
    # reserves and the limits half's raises read the same table.
    table = procfs.process_table()
    sysctl_half = sysctl.plan(settings, options_, test, table=table)
    limits_half = limits.plan(settings, options_, table)
    errors = sysctl_half["errors"] + limits_half["errors"]
    originals, pending = None, []
    try:
        originals = journal.load_originals(options_["state_dir"])  # a broken record would stop the first write
        pending = journal.pending_restarts(options_["state_dir"])
    except CommandExecutionError as exc:
        errors.append(str(exc))
    return Plan(arguments, test, options_, settings, sysctl_half, limits_half, originals, pending, errors, seen)


def remake(plan, pillar, test=False):
    """Plan ``plan``'s arguments again, in place (the run's other states hold
    this object): under the lock, before a write, when the plan was a dry
    run, is spent, or is stale."""
    new = make(plan.options, pillar, plan.arguments, test)
    plan.__dict__.update(new.__dict__)
    plan.clear()
    plan.update(new)
    return plan


def fail(plan):
    """Stop a call that acts: every problem the plan found, and that nothing was written."""
    text = "\n".join(plan.errors)
    # A pillar that did not resolve says so already, with what to fix.
    raise CommandExecutionError(text if "\nNothing was changed" in text else text + "\nNothing was changed")


def remember_limits(plan, part=None):
    """Put the originals of every file the limits half would change (of one
    part, or all) on record before the first of them is written, so that a
    full disk stops the run before anything changed, and ``clean`` can put
    back whatever a run wrote before it failed."""
    items = [item for name, groups in plan.limits["parts"].items() if part in (None, name)
             for group in groups for item in group["files"] if item["changed"]]
    if not items:
        return
    state_dir = plan.options["state_dir"]
    # Read again under the lock: an earlier write of this run added to it.
    journal.remember(state_dir, journal.load_originals(state_dir), files=[item["path"] for item in items],
                     written={item["path"]: item["text"] for item in items})
