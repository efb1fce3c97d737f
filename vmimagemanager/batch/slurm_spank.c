/*
 * vmimagemanager's SPANK plugin: Slurm's stand-in for SGE's starter_method.
 *
 * Slurm has no per-partition starter. In the remote context (slurmstepd), each task calls
 * slurm_spank_task_init as the job's user, with its standard streams already in place, just
 * before slurmstepd would execve() the task's command. This plugin execve()s the vmimagemanager
 * starter there instead, with the job's own environment and the original command appended:
 *
 *     PYTHON -I STARTER --config CONFIG --job JOBID --step STEP -- ARGV...
 *
 * STEP is "batch" for the batch script and the step number otherwise. The starter decides:
 * the batch step goes into the job's VM (or ends with the prolog's reason); other steps run
 * natively, unless the job has a VM (the guest has no Slurm to run a step in).
 * Slurm 22.05 has no spank_prepend_task_argv, hence the execve().
 *
 * plugstack.conf (written by 'vmimagemanager slurm install-hooks'):
 *     required /path/vmim_spank.so python=/usr/bin/python3 starter=/usr/bin/vmim-slurm-starter
 *              config=/etc/vmimagemanager/vmimagemanager.yaml
 *
 * Build: cc -shared -fPIC -o vmim_spank.so slurm_spank.c (needs spank.h: libslurm-dev).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

SPANK_PLUGIN(vmimagemanager, 1);

#define VALUE_MAX 4096

static char python[VALUE_MAX];
static char starter[VALUE_MAX];
static char config[VALUE_MAX];

static int option(int ac, char **av, const char *key, char *out)
{
    size_t n = strlen(key);
    for (int i = 0; i < ac; i++) {
        if (strncmp(av[i], key, n) == 0 && av[i][n] == '=') {
            if (strlen(av[i] + n + 1) >= VALUE_MAX || av[i][n + 1] != '/')
                return -1;
            strcpy(out, av[i] + n + 1);
            return 0;
        }
    }
    return -1;
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
    (void) sp;
    if (spank_context() != S_CTX_REMOTE)
        return ESPANK_SUCCESS;
    if (option(ac, av, "python", python) || option(ac, av, "starter", starter) ||
        option(ac, av, "config", config)) {
        slurm_error("vmimagemanager: plugstack.conf needs python=, starter= and config= "
                    "(absolute paths); rerun 'vmimagemanager slurm install-hooks'");
        return ESPANK_ERROR;
    }
    return ESPANK_SUCCESS;
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
    uint32_t job_id = 0, step_id = 0;
    int argc = 0;
    char **argv = NULL, **env = NULL;
    char job[32], step[32];
    (void) ac;
    (void) av;

    if (spank_get_item(sp, S_JOB_ID, &job_id) != ESPANK_SUCCESS ||
        spank_get_item(sp, S_JOB_STEPID, &step_id) != ESPANK_SUCCESS ||
        spank_get_item(sp, S_JOB_ARGV, &argc, &argv) != ESPANK_SUCCESS ||
        spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS) {
        fprintf(stderr, "vmimagemanager: cannot read the task's job id, command or "
                "environment from Slurm; the task did not run\n");
        return ESPANK_ERROR;
    }
    snprintf(job, sizeof job, "%" PRIu32, job_id);
    if (step_id == SLURM_BATCH_SCRIPT)
        snprintf(step, sizeof step, "batch");
    else
        snprintf(step, sizeof step, "%" PRIu32, step_id);

    char **args = calloc((size_t) argc + 11, sizeof *args);
    if (args == NULL)
        return ESPANK_ERROR;
    int n = 0;
    args[n++] = python;
    args[n++] = "-I";
    args[n++] = starter;
    args[n++] = "--config";
    args[n++] = config;
    args[n++] = "--job";
    args[n++] = job;
    args[n++] = "--step";
    args[n++] = step;
    args[n++] = "--";
    for (int i = 0; i < argc; i++)
        args[n++] = argv[i];
    args[n] = NULL;
    execve(python, args, env);
    fprintf(stderr, "vmimagemanager: cannot start the starter %s with %s: %s; the task did "
            "not run\n", starter, python, strerror(errno));
    _exit(127);
}
