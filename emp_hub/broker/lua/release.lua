-- Hand a held job back without penalty: it returns to its queue at its original place.
-- ARGV[4] id, ARGV[5] token.
local id, token = ARGV[4], ARGV[5]
local j, err = held(id, token, {'class', 'score', 'seq'})
if not j then return err end
redis.call('ZREM', K.leases, id)
redis.call('HSET', K.job(id), 'token', '', 'worker', '')
back_to_pending(id, j, 'active', 'released')
announce({j.class})
return 1
