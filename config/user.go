package config

import (
	"fmt"
	"os/user"
	"strconv"
)

// Credentials are the user and groups that workers run as.
type Credentials struct {
	UID, GID uint32
	// Groups are the supplementary groups: the configured (or primary)
	// group and the user's other groups.
	Groups []uint32
	// Name is the user as configured, for messages.
	Name string
}

// WorkerCredentials resolves User and Group: nil when no user is set.
// Group "" means the user's primary group. A number that names no user
// (group) is taken as a uid (gid).
func (c *Config) WorkerCredentials() (*Credentials, error) {
	if c.User == "" {
		if c.Group != "" {
			return nil, &Error{Key: "group", Reason: fmt.Sprintf("%q is set without a user", c.Group)}
		}
		return nil, nil
	}
	u, err := lookupUser(c.User)
	if err != nil {
		return nil, &Error{Key: "user", Reason: err.Error()}
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return nil, &Error{Key: "user", Reason: fmt.Sprintf("%q has uid %q", c.User, u.Uid)}
	}
	gidStr := u.Gid
	if c.Group != "" {
		g, err := lookupGroup(c.Group)
		if err != nil {
			return nil, &Error{Key: "group", Reason: err.Error()}
		}
		gidStr = g.Gid
	}
	gid, err := strconv.ParseUint(gidStr, 10, 32)
	if err != nil {
		return nil, &Error{Key: "group", Reason: fmt.Sprintf("gid %q is not a number", gidStr)}
	}
	cr := &Credentials{UID: uint32(uid), GID: uint32(gid), Groups: []uint32{uint32(gid)}, Name: c.User}
	if ids, err := u.GroupIds(); err == nil {
		for _, id := range ids {
			if n, err := strconv.ParseUint(id, 10, 32); err == nil && uint32(n) != cr.GID {
				cr.Groups = append(cr.Groups, uint32(n))
			}
		}
	}
	return cr, nil
}

func lookupUser(name string) (*user.User, error) {
	u, err := user.Lookup(name)
	if err == nil {
		return u, nil
	}
	if _, nerr := strconv.ParseUint(name, 10, 32); nerr == nil {
		if u, ierr := user.LookupId(name); ierr == nil {
			return u, nil
		}
	}
	return nil, fmt.Errorf("no user %q on this host", name)
}

func lookupGroup(name string) (*user.Group, error) {
	g, err := user.LookupGroup(name)
	if err == nil {
		return g, nil
	}
	if _, nerr := strconv.ParseUint(name, 10, 32); nerr == nil {
		if g, ierr := user.LookupGroupId(name); ierr == nil {
			return g, nil
		}
	}
	return nil, fmt.Errorf("no group %q on this host", name)
}

// checkUser reports a user or group that does not exist on this host.
func (c *Config) checkUser(bad func(key, format string, args ...any)) {
	if _, err := c.WorkerCredentials(); err != nil {
		e := err.(*Error)
		bad(e.Key, "%s", e.Reason)
	}
}
