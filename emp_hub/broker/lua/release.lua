-- Hand a held job back without penalty: it returns to its queue at its original place.
-- ARGV[4] id, ARGV[5] token.
local id, token = ARGV[4], ARGV[5]
local j, err = held(id, token, {'class', 'score', 'seq'})
if not j then return err end
redis.call('ZREM', P .. 'leases', id)
redis.call('HSET', jkey(id), 'token', '', 'worker', '')
enqueue(id, j.class, j.score)
set_status(id, j.seq, 'active', 'pending')
event(id, 'type', 'status', 'status', 'pending', 'reason', 'released')
announce({j.class})
return 1
