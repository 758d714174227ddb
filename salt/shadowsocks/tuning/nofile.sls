{#- Open-file limits that reach the daemons. Sysctls alone do not stop
    `too many open files`: the daemon's own limit must be raised where its
    service manager reads it, and the daemon started again.

    Pillar: shadowsocks:tuning:nofile and shadowsocks:tuning:limits (defaults
    in shadowsocks/defaults.yaml). Every file state requires the check, so bad
    input or a limit this box cannot grant changes nothing. A changed file
    stops and starts its service (never Debian's `restart`, which only stops
    supervisor); the last state reads /proc to show the limit arrived. -#}
{%- from "shadowsocks/map.jinja" import tuning with context %}
{%- set nofile = tuning.nofile %}
{#- Malformed pillar still renders: the check state reports it, nothing else runs. #}
{%- set raw_limits = tuning.get("limits") %}
{%- set limits = raw_limits if raw_limits is mapping else {} %}
{%- set init = limits.get("init_system", "auto") %}
{#- `auto`: the init grain (systemd exactly when it is PID 1). A grain, not a
    module call: under salt-ssh every call made while rendering is one more
    round trip (about 1.3 s). #}
{%- set systemd = init == "systemd" or (init == "auto" and grains.get("init") == "systemd") %}
{%- set restart = {"when": limits.get("restart", "running"), "timeout": limits.get("timeout", 30), "init_system": init} %}
{%- set check = "shadowsocks-tuning-nofile-check" %}
{#- A limit already higher in a file is kept, like a capacity sysctl, unless
    pillar shadowsocks:tuning:force is true or lists `nofile`. #}
{%- set force_list = tuning.get("force") %}
{%- set force = force_list is sameas true or (force_list is sequence and force_list is not string and "nofile" in force_list) %}

{%- macro file_state(id, state, name, args) %}
{{ id }}:
  shadowsocks_tuning.{{ state }}:
    - name: {{ name|json }}
{%- for key, value in args.items() %}
    - {{ key }}: {{ value|json }}
{%- endfor %}
    - require:
      - shadowsocks_tuning: {{ check }}
{%- endmacro %}

{%- macro restart_state(id, name, pidfile, watched) %}
{%- if name and watched %}
{{ id }}:
  shadowsocks_tuning.service_restarted:
    - name: {{ name|json }}
    - pidfile: {{ (pidfile or none)|json }}
    - when: {{ restart.when|json }}
    - timeout: {{ restart.timeout|json }}
    - init_system: {{ restart.init_system|json }}
    - onchanges:
{%- for watched_id in watched %}
      - shadowsocks_tuning: {{ watched_id }}
{%- endfor %}
{%- endif %}
{%- endmacro %}

{{ check }}:
  shadowsocks_tuning.nofile_checked:
    - nofile: {{ nofile|json }}
    - limits: {{ raw_limits|json }}

{#- supervisor: `ulimit -n N` in its defaults file (sourced by the init
    script), minfds=N in supervisord.conf, a drop-in under systemd. #}
{%- set sup = limits.get("supervisor") if limits.get("supervisor") is mapping else {} %}
{%- set watched = [] %}
{%- if sup.get("defaults_file") %}
{{ file_state("shadowsocks-tuning-supervisor-ulimit", "ulimit_line", sup.defaults_file,
              {"nofile": nofile, "placement": "end", "if_missing": "skip", "force": force}) }}
{%- do watched.append("shadowsocks-tuning-supervisor-ulimit") %}
{%- endif %}
{%- if sup.get("config") %}
{{ file_state("shadowsocks-tuning-supervisor-minfds", "supervisord_minfds", sup.config,
              {"nofile": nofile, "if_missing": "skip", "force": force}) }}
{%- do watched.append("shadowsocks-tuning-supervisor-minfds") %}
{%- endif %}
{%- if systemd and sup.get("unit") %}
{{ file_state("shadowsocks-tuning-supervisor-dropin", "systemd_nofile", sup.unit,
              {"nofile": nofile, "if_missing": "skip"}) }}
{%- do watched.append("shadowsocks-tuning-supervisor-dropin") %}
{%- endif %}
{{ restart_state("shadowsocks-tuning-supervisor-restart", sup.get("unit") if systemd else sup.get("service"),
                 sup.get("pidfile"), watched) }}

{#- shadowsocks-libev (Debian packaging): its init script runs
    `ulimit -n ${MAXFD}` from its defaults file; its units get drop-ins. #}
{%- set ssl = limits.get("shadowsocks_libev") if limits.get("shadowsocks_libev") is mapping else {} %}
{%- if ssl.get("defaults_file") %}
{{ file_state("shadowsocks-tuning-shadowsocks-libev-maxfd", "assignment", ssl.defaults_file,
              {"key": "MAXFD", "value": nofile, "if_missing": "skip", "force": force}) }}
{%- if not systemd %}
{{ restart_state("shadowsocks-tuning-shadowsocks-libev-restart", ssl.get("service"), ssl.get("pidfile"),
                 ["shadowsocks-tuning-shadowsocks-libev-maxfd"]) }}
{%- endif %}
{%- endif %}

{#- Init scripts named in pillar, e.g. /etc/init.d/shadowsocks of the Python
    server: `ulimit -n N` before the daemon starts. A missing one fails the check. #}
{%- set scripts = limits.get("init_scripts") %}
{%- for item in (scripts if scripts is sequence and scripts is not string and scripts is not mapping else []) %}
{%- set item = item if item is mapping else {"path": item} %}
{%- set path = item.get("path") | string %}
{%- set service = item.get("service") or path.split("/")[-1] %}
{%- set id = "shadowsocks-tuning-initscript-" ~ service %}
{{ file_state(id ~ "-ulimit", "ulimit_line", path, {"nofile": nofile, "placement": "init", "if_missing": "fail", "force": force}) }}
{{ restart_state(id ~ "-restart", service, item.get("pidfile"), [id ~ "-ulimit"]) }}
{%- endfor %}

{#- systemd units (template units included): a LimitNOFILE drop-in each. #}
{%- if systemd %}
{%- set units = [] %}
{%- for more in (ssl.get("units"), limits.get("units")) %}
{%- for unit in (more if more is sequence and more is not string and more is not mapping else []) %}
{%- if unit not in units %}{% do units.append(unit) %}{% endif %}
{%- endfor %}
{%- endfor %}
{%- for unit in units %}
{%- set id = "shadowsocks-tuning-unit-" ~ unit %}
{{ file_state(id ~ "-dropin", "systemd_nofile", unit, {"nofile": nofile, "if_missing": "skip"}) }}
{{ restart_state(id ~ "-restart", unit, none, [id ~ "-dropin"]) }}
{%- endfor %}
{%- endif %}

{#- Proof: the limit each running daemon really got (last, after the restarts). #}
{%- set verify = limits.get("verify") if limits.get("verify") is mapping else {} %}
shadowsocks-tuning-nofile-verify:
  shadowsocks_tuning.nofile_reached:
    - nofile: {{ nofile|json }}
    - pidfiles: {{ (verify.get("pidfiles") or [])|json }}
    - wait: {{ verify.get("wait", 5)|json }}
