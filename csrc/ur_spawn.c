/*
 * ur_spawn.c - see ur_spawn.h.
 */
#define _GNU_SOURCE
#include "ur_spawn.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define UR_SPAWN_MAXFDS 8
/* The copies of the caller's descriptors are at or above this, so that no
 * dup2 onto a low slot can overwrite a copy still to be placed. */
#define UR_SPAWN_FDBASE 16

struct ur_spawn {
	pthread_t thread;
	char *path;
	char **argv, **envp;
	int fds[UR_SPAWN_MAXFDS];
	int nfds;
	unsigned delay_us;
	pid_t pid;
	int err; /* errno of the spawn, 0 if it started */
};

static void free_vec(char **v)
{
	if (!v)
		return;
	for (char **p = v; *p; p++)
		free(*p);
	free(v);
}

static char **copy_vec(char *const v[])
{
	size_t n = 0;
	while (v[n])
		n++;
	char **c = calloc(n + 1, sizeof(char *));
	if (!c)
		return NULL;
	for (size_t i = 0; i < n; i++) {
		if (!(c[i] = strdup(v[i]))) {
			free_vec(c);
			return NULL;
		}
	}
	return c;
}

static void ur_spawn_free(struct ur_spawn *s)
{
	for (int i = 0; i < s->nfds; i++)
		if (s->fds[i] >= 0)
			close(s->fds[i]);
	free(s->path);
	free_vec(s->argv);
	free_vec(s->envp);
	free(s);
}

static void *spawn_thread(void *arg)
{
	struct ur_spawn *s = arg;
	if (s->delay_us)
		usleep(s->delay_us);
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t at;
	sigset_t none;
	int err = posix_spawn_file_actions_init(&fa);
	if (!err) {
		if (!(err = posix_spawnattr_init(&at))) {
			for (int i = 0; i < s->nfds && !err; i++)
				err = posix_spawn_file_actions_adddup2(&fa, s->fds[i], i);
			if (!err)
				err = posix_spawn_file_actions_addclosefrom_np(&fa, s->nfds);
			sigemptyset(&none);
			if (!err)
				err = posix_spawnattr_setsigmask(&at, &none);
			if (!err)
				err = posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGMASK);
			if (!err)
				err = posix_spawn(&s->pid, s->path, &fa, &at, s->argv, s->envp);
			posix_spawnattr_destroy(&at);
		}
		posix_spawn_file_actions_destroy(&fa);
	}
	s->err = err;
	/* The child has its copies (or there is none): ours go now, on every
	 * path, so that a socket whose other end only the child was to hold
	 * reads as closed. */
	for (int i = 0; i < s->nfds; i++) {
		close(s->fds[i]);
		s->fds[i] = -1;
	}
	return NULL;
}

int ur_spawn_start(const char *path, char *const argv[], char *const envp[], const int *fds, int nfds,
		   unsigned delay_us, struct ur_spawn **out)
{
	if (nfds < 0 || nfds > UR_SPAWN_MAXFDS)
		return -EINVAL;
	struct ur_spawn *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	for (int i = 0; i < UR_SPAWN_MAXFDS; i++)
		s->fds[i] = -1;
	s->nfds = nfds;
	s->delay_us = delay_us;
	int err = 0;
	if (!(s->path = strdup(path)) || !(s->argv = copy_vec(argv)) || !(s->envp = copy_vec(envp)))
		err = ENOMEM;
	for (int i = 0; i < nfds && !err; i++)
		if ((s->fds[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, UR_SPAWN_FDBASE)) < 0)
			err = errno;
	if (err) {
		ur_spawn_free(s);
		return -err;
	}
	/* The thread starts with every signal blocked: a signal for the
	 * process must not be handled on a thread the Go runtime (or any
	 * caller) does not know. */
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	err = pthread_create(&s->thread, NULL, spawn_thread, s);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (err) {
		ur_spawn_free(s);
		return -err;
	}
	*out = s;
	return 0;
}

int ur_spawn_wait(struct ur_spawn *s, int *pid)
{
	int err = pthread_join(s->thread, NULL);
	if (err)
		return -err; /* cannot happen for a thread ur_spawn_start made */
	err = s->err;
	*pid = s->pid;
	ur_spawn_free(s);
	return -err;
}
