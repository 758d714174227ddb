"""
Declare the shadowsocks kernel tuning; the work is done by the
``shadowsocks_tuning`` execution module.

.. code-block:: yaml

    shadowsocks-tuning-sysctls:
      shadowsocks_tuning.tuned:
        - profile: bbr          # anything left out comes from pillar shadowsocks:tuning
"""

from salt.exceptions import CommandExecutionError, SaltInvocationError

__virtualname__ = "shadowsocks_tuning"


def __virtual__():
    if "shadowsocks_tuning.apply" in __salt__:
        return __virtualname__
    return (False, "shadowsocks_tuning state: the shadowsocks_tuning execution module is not loaded (Linux only)")


def tuned(name, profile=None, sysctls=None, config=None, force=None, policy=None, congestion_fallback=None):
    """
    Make the kernel tuning of a profile live now and persisted for the next
    boot. Every argument left out is read from pillar ``shadowsocks:tuning``.

    name
        An ID; not used otherwise.
    profile
        ``high-latency``, ``low-latency``, ``low-memory``, ``bbr`` or a pillar profile.
    sysctls
        ``{key: value}`` overrides that win over the profile.
    config
        The persisted file (default ``/etc/sysctl.d/local.conf``).
    force
        Capacity keys that may be lowered (or ``True`` for all).
    policy
        ``{unavailable: warn|strict, override: warn|strict, keys: {key: warn|strict}}``.
    congestion_fallback
        Congestion control to use when the wanted one cannot be made available.

    CLI Example:

    .. code-block:: bash

        salt-call state.single shadowsocks_tuning.tuned name=tuning profile=bbr config=/tmp/t.conf
    """
    ret = {"name": name, "result": False, "changes": {}, "comment": ""}
    args = {
        "profile": profile, "sysctls": sysctls, "config": config, "force": force,
        "policy": policy, "congestion_fallback": congestion_fallback,
    }
    try:
        if __opts__["test"]:
            outcome = __salt__["shadowsocks_tuning.diff"](**args)
            if outcome["errors"]:
                ret["comment"] = "\n".join(outcome["errors"] + outcome["comment"])
                return ret
        else:
            outcome = __salt__["shadowsocks_tuning.apply"](**args)
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret["comment"] = str(exc)
        return ret

    ret["changes"] = outcome["changes"]
    lines = outcome["comment"]
    if not outcome["changes"]:
        ret["result"] = True
        ret["comment"] = "\n".join([f"Tuning of profile {outcome['profile']} is in place"] + lines)
    elif __opts__["test"]:
        ret["result"] = None
        ret["comment"] = "\n".join([f"Profile {outcome['profile']} would be applied"] + lines)
    else:
        ret["result"] = True
        ret["comment"] = "\n".join([f"Profile {outcome['profile']} applied"] + lines)
    return ret


def cleaned(name):
    """
    Undo ``tuned``: the live sysctls go back to the values found before the
    first change, and every file this package changed is restored byte for
    byte (or removed if it created it).

    CLI Example:

    .. code-block:: bash

        salt-call state.single shadowsocks_tuning.cleaned name=undo test=True
    """
    ret = {"name": name, "result": False, "changes": {}, "comment": ""}
    try:
        changes = __salt__["shadowsocks_tuning.clean"](test=__opts__["test"])
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret["comment"] = str(exc)
        return ret
    ret["changes"] = changes
    if not changes:
        ret.update(result=True, comment="Nothing to undo: no change by shadowsocks_tuning is on record")
    elif __opts__["test"]:
        ret.update(result=None, comment=f"{len(changes)} item(s) would be put back")
    else:
        ret.update(result=True, comment=f"{len(changes)} item(s) put back")
    return ret
